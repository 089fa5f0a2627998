#!/usr/bin/env bash
# The wheel as a user installs it (make test-wheel; CI runs it): build it from this checkout, install it into a
# fresh virtualenv, and run the quickstart with the console command from a directory outside the clone.
#
#   make test-wheel                       # PYTHON=... picks the interpreter that builds and hosts the venv
#   KEEP=1 bash scripts/test_wheel.sh     # keep the temporary directory (its path is printed)
#
# The venv sees this environment's packages (--system-site-packages), so torch and vLLM are not downloaded
# again; the project itself must come from the wheel: the run checks that online_rl is imported from the
# venv's site-packages, and that the wheel holds no top-level module but online_rl and hydra_plugins.
set -euo pipefail
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d -t online-rl-wheel.XXXXXX)
[ -n "${KEEP:-}" ] && echo "keeping $WORK" || trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # the tests point it at the checkout's src/; here nothing may come from the checkout

# built from a copy of the files git tracks or would (not ignored): a build/ left in the checkout by an
# earlier in-tree build would otherwise bring files since deleted into the wheel
mkdir "$WORK/source"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --ignore-failed-read) \
  | tar -xf - -C "$WORK/source"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/source"
WHEEL=$(ls "$WORK"/dist/online_rl-*.whl)
echo "built $(basename "$WHEEL")"
"$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
assert top == {"online_rl", "hydra_plugins"}, f"the wheel installs top-level {sorted(top)}"
for needed in ("online_rl/conf/train.yaml", "online_rl/conf/recipe/grpo_numina_qwen2_0.5b.yaml",
               "online_rl/rewards/digits.py", "hydra_plugins/online_rl_launcher/process_per_job.py"):
    assert needed in names, f"{needed} is not in the wheel"
assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), "no LICENSE in the wheel"
print(f"wheel: {len(names)} files, top-level {sorted(top)}, configs and LICENSE inside")
PY

"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VENV_PYTHON="$WORK/venv/bin/python"
# first the project alone into the venv (an editable checkout in the base environment would otherwise count
# as installed), then its declared requirements, which the base environment mostly satisfies already
"$VENV_PYTHON" -m pip install --quiet --no-deps --ignore-installed "$WHEEL"
"$VENV_PYTHON" -m pip install --quiet "$WHEEL"

mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"  # outside the clone: nothing of it on the import path
"$VENV_PYTHON" -c "
import online_rl, sysconfig
site = sysconfig.get_paths()['purelib']
assert online_rl.__file__.startswith(site), f'online_rl comes from {online_rl.__file__}, not the wheel in {site}'
print('online_rl from', online_rl.__file__)
"
HF_HUB_OFFLINE=1 "$WORK/venv/bin/online-rl-train" max_steps=2 eval_every=0 "hydra.run.dir=$WORK/elsewhere/run" \
  2>&1 | tee "$WORK/train.out" | grep -E "step [0-9]+/2|Final model|Error|error" || true
grep -q "step 2/2" "$WORK/train.out" || { tail -40 "$WORK/train.out"; echo "online-rl-train did not finish"; exit 1; }
test -f "$WORK/elsewhere/run/model/model.safetensors" -a -f "$WORK/elsewhere/run/train.log"
echo "online-rl-train ran the quickstart from $WORK/elsewhere: run/model/ and run/train.log written"
