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
    missing = [n for n in ("avx512", "amx") if n not in lorakern.available_isas()]
    if missing:
        r = _run(missing[0])
        assert r.returncode != 0 and "supports at most" in r.stderr


def test_records_named_alike_on_both_sides():
    """The records that cross into C++ (slot table columns and kinds, bank view, adapter parts) name the same
    fields in the same order in lorakern.formats and in the extension; a mismatch refuses to load."""
    import types

    from lorakern import _native
    from lorakern.formats.bank import BankView, SlotRow
    lib = _native.native()
    assert tuple(lib.RECORDS["SlotRow"]) == SlotRow._fields and tuple(lib.RECORDS["BankView"]) == BankView._fields
    for name in ("SlotRow", "BankView", "LoraPartView", "LoraParts"):
        bad = dict(lib.RECORDS)
        bad[name] = tuple(reversed(bad[name]))
        with pytest.raises(_native.NativeLibraryError, match=name):
            _native._check_records(types.SimpleNamespace(RECORDS=bad))
    _native._check_records(lib)
    assert _native.native() is lib


def test_no_vector_instructions_in_shared_template_code():
    """Only the ISA files may hold AVX/AVX-512 code, each behind its run-time check. A template function with
    external linkage (a std::vector member, say) instantiated in an ISA file is a weak symbol that the linker may
    pick for every caller, generic code included, which would then fault on a CPU without those instructions (one
    did: std::vector<float>::_M_fill_assign from the AMX GEMM's file, with zmm code). Every C++ function the module
    exports is disassembled and must use no ymm, zmm or mask register."""
    import re
    import shutil

    from lorakern import _C
    if not (shutil.which("nm") and shutil.which("objdump")):
        pytest.skip("binutils (nm, objdump) not installed")
    so = _C.__file__
    syms = subprocess.run(["nm", "-D", "-S", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    checked, bad = 0, []
    for line in syms.splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[3].startswith("_Z") or int(parts[1], 16) == 0:
            continue
        start, size = int(parts[0], 16), int(parts[1], 16)
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}",
                              f"--stop-address={start + size}", so], capture_output=True, text=True, check=True).stdout
        checked += 1
        if re.search(r"%[yz]mm\d|%k[0-7]\b", dis):
            bad.append(parts[3])
    assert checked > 0
    assert not bad, f"exported functions with AVX/AVX-512 code: {bad[:5]}"
