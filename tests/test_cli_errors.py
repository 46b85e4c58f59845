"""Every subcommand given a missing, truncated or malformed file: one line ``lorakern: error: ...`` naming
the file, exit status 2, no traceback (``--debug`` shows it)."""
import json
import subprocess
import sys

import pytest
import torch

from lorakern.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    good = tmp / "adapter"
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(good)
    f = {"good_adapter": good}
    # truncated safetensors
    trunc = tmp / "trunc_adapter"
    trunc.mkdir()
    (trunc / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    data = (good / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    f["trunc_adapter"] = trunc
    badcfg = tmp / "badcfg_adapter"
    badcfg.mkdir()
    (badcfg / "adapter_config.json").write_text("{not json")
    (badcfg / "adapter_model.safetensors").write_bytes(data)
    f["badcfg_adapter"] = badcfg
    f["missing"] = tmp / "does_not_exist"
    f["trunc_file"] = tmp / "trunc.safetensors"
    f["trunc_file"].write_bytes(data[:40])
    f["bad_json"] = tmp / "bad.json"
    f["bad_json"].write_text('{"instruction": "x", "examples": [')
    f["good_json"] = tmp / "good.json"
    f["good_json"].write_text(json.dumps({"instruction": "x", "examples": [{"input": "a", "output": "b"}]}))
    mdir = tmp / "model_badcfg"
    mdir.mkdir()
    (mdir / "config.json").write_text("[1, 2")
    f["model_badcfg"] = mdir
    mdir = tmp / "model_trunc"
    model.save_pretrained(mdir)
    w = mdir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    f["model_trunc"] = mdir
    empty = tmp / "empty_data"
    empty.mkdir()
    f["empty_data"] = empty
    return f


def run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


CASES = [
    ("compress-adapter", lambda f, t: ["compress-adapter", str(f["missing"]), str(t / "o.safetensors")], "does_not_exist"),
    ("compress-adapter", lambda f, t: ["compress-adapter", str(f["trunc_adapter"]), str(t / "o.safetensors")],
     "trunc_adapter"),
    ("compress-adapter", lambda f, t: ["compress-adapter", str(f["badcfg_adapter"]), str(t / "o.safetensors")],
     "badcfg_adapter"),
    ("compress-adapter", lambda f, t: ["compress-adapter", str(f["good_adapter"]), str(t / "no" / "o.safetensors")],
     "no"),
    ("compress-adapter", lambda f, t: ["compress-adapter", str(f["good_adapter"]), str(t / "o.safetensors"),
                                       "--model", str(f["model_badcfg"])], "model_badcfg"),
    ("generate-adapter", lambda f, t: ["generate-adapter", "--examples", str(f["missing"]), "--out", str(t / "g")],
     "does_not_exist"),
    ("generate-adapter", lambda f, t: ["generate-adapter", "--examples", str(f["bad_json"]), "--out", str(t / "g")],
     "bad.json"),
    ("generate-adapter", lambda f, t: ["generate-adapter", "--examples", str(f["good_json"]), "--out", str(t / "g"),
                                       "--generator", str(f["trunc_file"])], "trunc.safetensors"),
    ("quantize", lambda f, t: ["quantize", str(f["missing"]), str(t / "q"), "--method", "rtn"], "does_not_exist"),
    ("quantize", lambda f, t: ["quantize", str(f["model_badcfg"]), str(t / "q"), "--method", "rtn"], "model_badcfg"),
    ("quantize", lambda f, t: ["quantize", str(f["model_trunc"]), str(t / "q"), "--method", "rtn"], "model_trunc"),
    ("demo", lambda f, t: ["demo", "--json", str(t / "no" / "d.json")], "no"),
    ("demo", lambda f, t: ["demo", "--model", "nope"], "built-in model"),
    ("train-generator", lambda f, t: ["train-generator", "--out", str(t / "no" / "g.safetensors")], "no"),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_files_give_one_line_and_status_2(case, files, tmp_path, capsys):
    name, make, needle = CASES[case]
    code, err = run(make(files, tmp_path), capsys)
    assert code == 2
    assert err.startswith("lorakern: error: ") and "\n" not in err and "Traceback" not in err
    assert needle in err  # names the file


def test_demo_with_data_folder_lacking_the_text(files, capsys, monkeypatch):
    monkeypatch.setenv("LORAKERN_DATA", str(files["empty_data"]))
    code, err = run(["demo"], capsys)
    assert code == 2 and "empty_data" in err and "test.txt" in err


def test_debug_shows_the_traceback(files, tmp_path):
    args = [sys.executable, "-m", "lorakern.cli", "compress-adapter", str(files["trunc_adapter"]), str(tmp_path / "o")]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("lorakern: error: ")
    p = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr
