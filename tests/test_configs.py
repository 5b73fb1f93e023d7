"""Every YAML in configs/ is valid for the script its header launches, and command-line flags override YAML."""

import re
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from kd_llm.cli import ConfigError, parse_with_config
from kd_llm.experiment import DistillationScriptArguments
from kd_llm.specialist import SpecialistArguments
from kd_llm.sweep import SweepArguments
from kd_llm.training import DistillationConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCRIPT_PARSERS = {
    "distill_llm.py": (DistillationScriptArguments, DistillationConfig),
    "train_specialist.py": (SpecialistArguments, TrainingArguments),
    "sweep.py": (SweepArguments, DistillationScriptArguments, DistillationConfig),
}
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def launch_command(path: Path) -> str:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    text = re.sub(r"\\\n\s*", " ", "\n".join(header))  # join backslash-continued lines
    match = re.search(r"Launch:\s*(.+)", text)
    assert match, f"{path.name}: the header must give its launch command on a 'Launch:' line"
    return match.group(1)


def test_there_are_configs():
    assert len(RUN_CONFIGS) >= 3 and ACCELERATE_CONFIGS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_parses_for_the_script_it_launches(path, tmp_path):
    command = launch_command(path)
    scripts = [name for name in SCRIPT_PARSERS if name in command]
    assert len(scripts) == 1, f"{path.name}: launch command names no known script: {command}"
    if "distill_llm.py" in command and path.name != "date_demo.yaml":
        assert f"--config configs/{path.name}" in command
    parsed = parse_with_config(SCRIPT_PARSERS[scripts[0]], ["--config", str(path), "--output_dir", str(tmp_path)])
    values = yaml.safe_load(path.read_text())
    base_fields = set(TrainingArguments.__dataclass_fields__)  # Trainer normalises these (e.g. report_to)
    for instance in parsed:
        for key, value in values.items():
            if key in instance.__dataclass_fields__ and key not in base_fields:
                assert getattr(instance, key) == value, f"{path.name}: {key}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_complete(path):
    values = yaml.safe_load(path.read_text())
    assert {"distributed_type", "num_processes", "mixed_precision"} <= set(values)
    assert "accelerate launch" in launch_command(path)


def test_command_line_overrides_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("temperature: 3.0\nalpha: 0.25\noutput_dir: from_yaml\ntrain_size: 10\n")
    script, training = parse_with_config((DistillationScriptArguments, DistillationConfig),
                                         ["--config", str(config), "--temperature", "1.5"])
    assert training.temperature == 1.5 and training.alpha == 0.25 and script.train_size == 10
    assert training.output_dir == "from_yaml"


def test_unknown_yaml_key_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("temprature: 3.0\n")
    with pytest.raises(ConfigError, match="unknown option.*temprature"):
        parse_with_config((DistillationScriptArguments, DistillationConfig), ["--config", str(config)])


@pytest.mark.parametrize("text, message", [("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")])
def test_malformed_yaml_is_an_error(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_with_config((DistillationScriptArguments, DistillationConfig), ["--config", str(config)])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_with_config((DistillationScriptArguments, DistillationConfig), ["--config", str(tmp_path / "no.yaml")])


def test_out_of_range_setting_in_yaml_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("temperature: 0\noutput_dir: x\n")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        parse_with_config((DistillationScriptArguments, DistillationConfig), ["--config", str(config)])
