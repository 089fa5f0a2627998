"""A sweep sent to Slurm (hydra/launcher=slurm_example): the sbatch script submitit writes for it, read back.

There is no cluster here, so `sbatch` on PATH is a script that keeps the submission file it is handed and
refuses it (and `srun`, which submitit only looks for, is there and never runs); everything before that (Hydra composing src/online_rl/conf/hydra/launcher/slurm_example.yaml through the search
path, the stock submitit launcher, submitit's SlurmExecutor rendering the job array) is the real thing."""

import os
import subprocess
import sys

from .conftest import ROOT

FAKE_SBATCH = """#!/bin/sh
cp "$1" "{kept}"
echo "sbatch: error: no cluster here" >&2
exit 1
"""


def test_slurm_sweep_submits_one_array_with_the_example_resources(tmp_path):
    kept = tmp_path / "submitted.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(kept=kept))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks it exists: the job script calls it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/launcher=slurm_example",
            "hydra.launcher.partition=a100",
            "hydra.launcher.timeout_min=90",
            "algo=grpo,rloo",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    assert result.returncode != 0 and "no cluster here" in result.stderr, result.stderr[-3000:]
    script = kept.read_text()
    directives = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    for expected in (
        "--partition=a100",  # the command line's override of the example's
        "--time=90",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--ntasks-per-node=1",
        "--array=0-1%2",  # both jobs of the sweep in one array (array_parallelism caps it at 8)
        "--job-name=train",
    ):
        assert expected in directives, (expected, sorted(directives))
    assert f"--output={sweep}/.submitit/%A_%a/%A_%a_0_log.out" in directives  # logs inside the sweep
    assert "submitit.core._submit" in script  # each task unpickles the job and runs it on its node
