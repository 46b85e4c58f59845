"""The LORAKERN_ISA environment switch, in fresh processes."""
import os
import subprocess
import sys

import pytest

import lorakern

CODE = "import lorakern, torch; torch.ops.lorakern.dequantize; print(lorakern.active_isa())"


def _run(isa):
    env = dict(os.environ, LORAKERN_ISA=isa)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("name", lorakern.available_isas())
def test_env_forces_path(name):
    r = _run(name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_rejects_unsupported_or_unknown():
    r = _run("bogus")
    assert r.returncode != 0 and "not one of" in r.stderr
    if "avx512" not in lorakern.available_isas():
        r = _run("avx512")
        assert r.returncode != 0 and "supports at most" in r.stderr
