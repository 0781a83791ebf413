"""Running the command-line scripts as a user would: a fresh Python process, output captured."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python scripts/NAME ARGS...`; never raises on a non-zero exit (tests check it)."""
    command = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def load_script(name: str):
    """scripts/NAME.py imported as a module (for its functions; `main` is not run)."""
    module_name = f"_lemo_script_{name}"  # never a real module's name
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
