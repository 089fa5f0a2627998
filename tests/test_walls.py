"""The walls between rooms (DESIGN.md, "Who may import whom"), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATHS = ["grpo.py", "rloo.py", "gspo.py", "cispo.py", "preference.py", "sampler_correction.py"]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def python_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in (ROOT / folder).rglob("*.py")]


def test_nothing_but_the_entry_points_and_tests_imports_the_loop():
    """The console command (online_rl/cli.py) is the one entry; a clone's train.py only calls it."""
    importers = [
        path.relative_to(ROOT).as_posix()
        for path in python_files("src", "scripts", "bench", "rewards")
        if "online_rl.loop" in imported_modules(path)
    ]
    assert importers == ["src/online_rl/cli.py"]
    assert imported_modules(ROOT / "src/online_rl/cli.py") == {"hydra", "online_rl.loop"}
    assert imported_modules(ROOT / "train.py") == {"online_rl.cli"}


def test_no_sys_path_manipulation_anywhere():
    offenders = [
        path
        for path in python_files("src", "scripts", "bench", "rewards", "tests")
        if "sys.path" in path.read_text() and path.name != "test_walls.py"
    ]
    assert offenders == []


def test_rewards_import_nothing_of_the_library():
    """The built-in rewards (online_rl/rewards/) stay plain functions a user can copy into rewards/."""
    paths = python_files("rewards", "src/online_rl/rewards")
    assert len(paths) >= 5
    for path in paths:
        assert not any(module.startswith("online_rl") for module in imported_modules(path)), path


def test_environments_import_nothing_of_the_library():
    """The built-in environments (online_rl/envs/) stay plain classes a user can copy into envs/."""
    paths = python_files("envs", "src/online_rl/envs")
    assert len(paths) >= 3
    for path in paths:
        assert not any(module.startswith("online_rl") for module in imported_modules(path)), path


def test_the_algorithm_maths_imports_torch_only():
    for name in MATHS:
        modules = imported_modules(ROOT / "src/online_rl/algorithms" / name)
        outside = {m for m in modules if m.split(".")[0] not in ("torch", "__future__", "dataclasses")}
        # the maths may reuse each other's pure functions (RLOO's sequence loss is GRPO's surrogate per action)
        assert outside <= {f"online_rl.algorithms.{other[:-3]}" for other in MATHS}, (name, outside)
