"""The `drlora` command line: bad input is refused in one sentence before torch is imported (seconds), help texts
name every builtin task, and `export --out` pointing at a file says so."""

import subprocess
import sys

import pytest

from drlora.builtin.tasks import TASKS
from drlora.cli import main


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("statement", ["import drlora.recipe.config", "import drlora",
                                       "from drlora import DRLoRAConfig; DRLoRAConfig(r_init=4)"])
def test_the_configuration_imports_without_torch(statement):
    done = _python("-c", f"{statement}; import sys; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_public_name_still_imports_from_the_package():
    import drlora

    for name in drlora.__all__:
        assert getattr(drlora, name) is not None
    from drlora import DRLoRAModel, get_dr_lora_model  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        drlora.nope  # noqa: B018


@pytest.mark.parametrize("args, message", [
    (["train", "typo"], "config file typo does not exist"),
    (["train", "train.learnig_rate=1"], "unknown config key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
    (["config", "--show", "x=1"], "unknown config key 'x'"),
    (["train", "drlora.r_init=20"], "drlora.r_init=20"),
])
def test_bad_config_is_refused_in_one_line_before_torch_is_imported(args, message):
    done = _python("-X", "importtime", "-m", "drlora.cli", *args)
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    errors = [line for line in lines if not line.startswith("import time:")]
    assert done.returncode == 2
    assert len(errors) == 1 and errors[0].startswith("drlora: error: ") and message in errors[0]
    assert "drlora.cli" in imported or "drlora" in imported  # the import log was read
    assert not {"torch", "transformers", "peft"} & imported


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["export", "--help"], ["compare", "--help"]])
def test_help_does_not_import_torch(args):
    done = _python("-c", "import sys; from drlora.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
                         "    pass\nprint('torch' in sys.modules)", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_help_texts_name_every_builtin_task(capsys):
    listed = f"({', '.join(TASKS)})"
    for command in ("eval", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert listed in " ".join(capsys.readouterr().out.split()), command  # argparse wraps eval's help


def test_export_to_a_file_says_out_must_be_a_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {tmp_path / 'no-model'}\n")  # never loaded
    (run / "adapter" / "adapter_config.json").write_text("{}")
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(run), "--format", "peft", "--out", str(target), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("drlora: error: --out ") and "is a file" in err and "folder" in err and "\n" not in err
        assert target.read_bytes() == b"keep me"
