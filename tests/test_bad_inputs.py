"""Bad inputs through the scripts' real entry points (``if __name__ == "__main__"``, run with runpy and a patched
sys.argv): each ends with one line ``<script>: <message>`` on stderr, a non-zero exit status and no traceback.

The table covers configs, the command line, data, models, teacher caches, resumes, the Hub push and the small
scripts; ``--debug`` and ``KD_LLM_DEBUG`` bring the traceback back; the line stays last under ``accelerate launch -q``.
"""

import errno
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from kd_llm.boundary import user_message
from tests.helpers.launch import free_port
from tests.helpers.scripts import ROOT

SCRIPTS = ROOT / "scripts"
# Fail fast: no evaluation, no report, a tiny run.
QUICK = ["--student_num_layers", "1", "--transfer_size", "0", "--train_size", "8", "--max_steps", "1",
         "--evaluate_skills", "false", "--write_report", "false", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_dir):
    """Files the cases point at: broken models, data files, checkpoints, a teacher cache and configs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w = {"root": root, "teacher": str(tiny_teacher_dir), "out": str(root / "out")}

    truncated = root / "truncated_teacher"
    shutil.copytree(tiny_teacher_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    w["truncated_teacher"] = str(truncated)
    pickled = root / "pickled_teacher"
    pickled.mkdir()
    shutil.copy(tiny_teacher_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    w["pickled_teacher"] = str(pickled)

    def jsonl(name, lines, raw=None):
        path = root / name
        path.write_bytes(raw if raw is not None else "\n".join(json.dumps(x) for x in lines).encode())
        w[name] = str(path)

    good = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(4)]
    jsonl("good.jsonl", good)
    jsonl("latin1.jsonl", None, raw=b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    jsonl("broken.jsonl", None, raw=b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    jsonl("empty_completions.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "}])
    jsonl("unknown_text.jsonl", [{"prompt": "a", "completion": "\u0416\u0416\u0416"}] * 2)

    def config(name, text):
        (root / name).write_text(text)
        w[name] = str(root / name)

    config("list_temperature.yaml", "temperature: [1, 2]\n")
    config("float_length.yaml", "max_length: 64.5\n")
    config("scalar_layers.yaml", "student_init: pruned\nstudent_layers: 2\n")
    config("misspelled.yaml", "temprature: 2\n")
    config("not_yaml.yaml", "temperature: [1, 2\n")
    config("bad_choice.yaml", "lr_scheduler_type: cosine_annealing\n")

    # Checkpoints, each broken one way (a checkpoint-N folder is what the trainer writes).
    whole = root / "ckpt_whole"
    whole.mkdir()
    shutil.copy(tiny_teacher_dir / "model.safetensors", whole / "model.safetensors")
    (whole / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({}, whole / "optimizer.pt")
    for name, damage in {
        "ckpt_partial": lambda c: (c / "trainer_state.json").unlink(),
        "ckpt_state": lambda c: (c / "trainer_state.json").write_text("{\"global_step\""),
        "ckpt_no_optimizer": lambda c: (c / "optimizer.pt").unlink(),
        "ckpt_corrupt": lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{]"),
    }.items():
        folder = root / name / "checkpoint-2"
        shutil.copytree(whole, folder)
        damage(folder)
        w[name] = str(folder)

    # A teacher cache whose metadata.json was edited by hand (k), as a user might "to try k=8".
    cache = root / "cache"
    runpy_main("cache_teacher", ["--teacher", w["teacher"], "--output_dir", str(root / "cache_out"),
                                 "--train_size", "8", "--teacher_cache", str(cache), "--cache_k", "4",
                                 "--disable_tqdm", "true"])
    meta = json.loads((cache / "metadata.json").read_text())
    meta["k"] = 8
    (cache / "metadata.json").write_text(json.dumps(meta))
    w["edited_cache"] = str(cache)
    (root / "not_a_cache").mkdir()
    w["not_a_cache"] = str(root / "not_a_cache")

    # A student checkpoint that ships its own tokenizer, one token longer than the teacher's.
    from kd_llm.models.char_tokenizer import build_char_tokenizer
    from tests.conftest import tiny_llama

    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    student = root / "other_tokenizer_student"
    tiny_llama(len(other), seed=3).save_pretrained(student)
    other.save_pretrained(student)
    w["other_tokenizer_student"] = str(student)

    # A run folder whose model.safetensors is half-written.
    run = root / "half_written_run"
    shutil.copytree(tiny_teacher_dir, run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) - 64])
    w["half_written_run"] = str(run)
    (root / "a_file").write_text("not a folder")
    w["a_file"] = str(root / "a_file")
    return w


def runpy_main(script: str, argv: list[str]):
    """Run scripts/<script>.py as ``python scripts/<script>.py argv`` would, in this process."""
    saved = sys.argv
    sys.argv = [str(SCRIPTS / f"{script}.py"), *argv]
    try:
        return runpy.run_path(str(SCRIPTS / f"{script}.py"), run_name="__main__")
    finally:
        sys.argv = saved


def distill(w, *extra, quick=True):
    return ["--teacher", w["teacher"], "--output_dir", w["out"], *(QUICK if quick else []), *extra]


# (id, script, argv from the world, the first words of the message after "<script>: ")
CASES = [
    # -- config files and the command line
    ("misspelled option", "distill_llm", lambda w: distill(w, "--temprature", "2"),
     "unknown option(s) --temprature (did you mean --temperature?)"),
    ("misspelled yaml key", "distill_llm", lambda w: ["--config", w["misspelled.yaml"], *distill(w)],
     lambda w: f"Config file {w['misspelled.yaml']!r} has unknown option(s): temprature (did you mean temperature?)"),
    ("config file missing", "distill_llm", lambda w: ["--config", w["root"] / "nope.yaml", *distill(w)],
     lambda w: f"Config file {str(w['root'] / 'nope.yaml')!r} does not exist"),
    ("config not yaml", "distill_llm", lambda w: ["--config", w["not_yaml.yaml"], *distill(w)],
     lambda w: f"Config file {w['not_yaml.yaml']!r} is not valid YAML"),
    ("list for a number", "distill_llm", lambda w: ["--config", w["list_temperature.yaml"], *distill(w)],
     lambda w: f"Config file {w['list_temperature.yaml']!r}: temperature takes one value, got list [1, 2]"),
    ("float for an integer", "distill_llm", lambda w: ["--config", w["float_length.yaml"], *distill(w)],
     lambda w: f"Config file {w['float_length.yaml']!r}: max_length takes an integer, got 64.5"),
    ("student_layers not a list", "distill_llm", lambda w: ["--config", w["scalar_layers.yaml"], *distill(w)],
     lambda w: f"Config file {w['scalar_layers.yaml']!r}: student_layers takes a list, got 2: write it as [2]"),
    ("unknown choice in yaml", "distill_llm", lambda w: ["--config", w["bad_choice.yaml"], *distill(w)],
     lambda w: f"Config file {w['bad_choice.yaml']!r}: lr_scheduler_type must be one of linear, cosine"),
    ("two values for one", "distill_llm", lambda w: distill(w, "--temperature", "1", "2"), "unexpected value(s) 2"),
    ("float on the command line", "distill_llm", lambda w: distill(w, "--max_length", "64.5"),
     "argument --max_length/--max-length: invalid int value: '64.5'"),
    ("negative learning rate", "distill_llm", lambda w: distill(w, "--learning_rate", "-0.001"),
     "Invalid DistillationConfig: learning_rate must be >= 0"),
    ("batch size 0", "distill_llm", lambda w: distill(w, "--per_device_train_batch_size", "0"),
     "Invalid DistillationConfig: per_device_train_batch_size must be at least 1"),
    ("no steps, no epochs", "distill_llm", lambda w: distill(w, "--max_steps", "0", "--num_train_epochs", "0"),
     "Invalid DistillationConfig: max_steps=0 and num_train_epochs=0.0 train nothing"),
    ("alpha above 1", "distill_llm", lambda w: distill(w, "--alpha", "1.5"), "Invalid DistillationConfig: alpha"),
    ("temperature 0", "distill_llm", lambda w: distill(w, "--temperature", "0"),
     "Invalid DistillationConfig: temperature must be > 0"),
    ("unknown divergence", "distill_llm", lambda w: distill(w, "--distillation_loss", "kl"),
     "Invalid DistillationConfig: distillation_loss must be one of"),
    ("unknown student_init", "distill_llm", lambda w: distill(w, "--student_init", "random"),
     "student_init must be scaled, pruned or checkpoint"),
    ("train_size 0", "distill_llm", lambda w: distill(w, "--train_size", "0"), "train_size must be at least 1"),
    ("min_teacher_accuracy as a percentage", "distill_llm", lambda w: distill(w, "--min_teacher_accuracy", "80"),
     "min_teacher_accuracy must be in [0, 1]"),
    # -- output folder
    ("output_dir is a file", "distill_llm", lambda w: [*distill(w), "--output_dir", w["a_file"]],
     lambda w: f"output_dir {w['a_file']!r} is a file, not a folder"),
    ("output_dir under a file", "distill_llm", lambda w: [*distill(w), "--output_dir", f"{w['a_file']}/run"],
     lambda w: f"output_dir {w['a_file'] + '/run'!r} cannot be created: {w['a_file']!r} is a file"),
    # -- models
    ("teacher path missing", "distill_llm", lambda w: [*distill(w), "--teacher", f"{w['root']}/no_teacher"],
     lambda w: f"model path {str(w['root']) + '/no_teacher'!r} does not exist"),
    ("truncated safetensors", "distill_llm", lambda w: [*distill(w), "--teacher", w["truncated_teacher"]],
     lambda w: f"Model folder {w['truncated_teacher']!r}: weight file {w['truncated_teacher'] + '/model.safetensors'!r} "
               "is damaged"),
    ("pickled weights only", "distill_llm", lambda w: [*distill(w), "--teacher", w["pickled_teacher"]],
     lambda w: f"model folder {w['pickled_teacher']} (from {w['pickled_teacher']!r}) only has pickled PyTorch weights"),
    ("more layers than the teacher", "distill_llm", lambda w: distill(w, "--student_num_layers", "3"),
     "student_num_layers=3, but a pruned student keeps between 1 and the teacher's 2 layers"),
    ("student checkpoint with its own tokenizer", "distill_llm",
     lambda w: [*distill(w), "--student_init", "checkpoint", "--student_checkpoint", w["other_tokenizer_student"]],
     "teacher and student tokenizers differ"),
    ("unknown embedded model", "distill_llm", lambda w: [*distill(w), "--teacher", "embedded:nope"],
     "unknown embedded model"),
    # -- data
    ("dataset folder missing", "distill_llm", lambda w: distill(w, "--dataset", f"{w['root']}/data/none"),
     lambda w: f"Data source {str(w['root']) + '/data/none'!r}: no such file or folder"),
    ("hub dataset offline", "distill_llm", lambda w: distill(w, "--dataset", "someone/some_dataset"),
     "Data source 'someone/some_dataset' was taken for a Hugging Face Hub dataset id"),
    ("jsonl not utf-8", "distill_llm", lambda w: distill(w, "--dataset", w["latin1.jsonl"]),
     lambda w: f"{w['latin1.jsonl']}: line 2 is not UTF-8 text (byte b'\\xe9' at column 16)"),
    ("jsonl malformed line", "distill_llm", lambda w: distill(w, "--dataset", w["broken.jsonl"]),
     lambda w: f"{w['broken.jsonl']}: line 2 is not valid JSON"),
    ("jsonl as its own eval split", "distill_llm",
     lambda w: [*distill(w, "--dataset", w["good.jsonl"]), "--evaluate_skills", "true"],
     lambda w: f"Data source {w['good.jsonl']!r} is a single dataset with no eval split"),
    ("every completion empty", "distill_llm", lambda w: distill(w, "--dataset", w["empty_completions.jsonl"]),
     lambda w: f"{w['empty_completions.jsonl']}: every completion is empty"),
    ("text all unknown tokens", "distill_llm", lambda w: distill(w, "--dataset", w["unknown_text.jsonl"]),
     lambda w: f"{w['unknown_text.jsonl']}, record 0: its supervised text tokenizes entirely into the unknown token"),
    # -- teacher caches
    ("cache folder is no cache", "distill_llm", lambda w: distill(w, "--teacher_cache", w["not_a_cache"], "--precompute_teacher_logits", "false"),
     lambda w: f"{w['not_a_cache']} is not a teacher cache: it has no metadata.json"),
    ("cache metadata edited", "distill_llm",
     lambda w: distill(w, "--teacher_cache", w["edited_cache"], "--precompute_teacher_logits", "false"),
     lambda w: f"{w['edited_cache']}/metadata.json does not match its metadata_sha256: it was edited by hand"),
    # -- resuming
    ("resume from a missing checkpoint", "distill_llm",
     lambda w: distill(w, "--resume_from_checkpoint", f"{w['root']}/checkpoint-9"),
     lambda w: f"resume_from_checkpoint {str(w['root']) + '/checkpoint-9'!r} does not exist"),
    ("resume true with nothing to resume", "distill_llm", lambda w: distill(w, "--resume_from_checkpoint", "true"),
     "resume_from_checkpoint is true, but output_dir"),
    ("resume from a partial checkpoint", "distill_llm",
     lambda w: distill(w, "--resume_from_checkpoint", w["ckpt_partial"]),
     lambda w: f"resume_from_checkpoint {w['ckpt_partial']!r} has no trainer_state.json (its save was interrupted)"),
    ("broken trainer_state.json", "distill_llm",
     lambda w: distill(w, "--resume_from_checkpoint", w["ckpt_state"]),
     lambda w: f"resume_from_checkpoint {w['ckpt_state']!r} has a broken trainer_state.json"),
    ("checkpoint without optimizer.pt", "distill_llm",
     lambda w: distill(w, "--resume_from_checkpoint", w["ckpt_no_optimizer"]),
     lambda w: f"resume_from_checkpoint {w['ckpt_no_optimizer']!r} has no optimizer.pt"),
    ("corrupt checkpoint weights", "distill_llm",
     lambda w: distill(w, "--resume_from_checkpoint", w["ckpt_corrupt"]),
     lambda w: f"resume_from_checkpoint {w['ckpt_corrupt']!r} has a damaged model.safetensors"),
    # -- the other scripts
    ("push a half-written model", "push_to_hub",
     lambda w: ["--output_dir", w["half_written_run"], "--hub_model_id", "someone/student"],
     lambda w: f"{w['half_written_run']}/model.safetensors is damaged"),
    ("push a missing folder", "push_to_hub",
     lambda w: ["--output_dir", f"{w['root']}/nowhere", "--hub_model_id", "someone/student"], "Output folder"),
    ("evaluate negative eval_size", "evaluate_skills", lambda w: ["--model", w["teacher"], "--eval_size", "-3"],
     "argument --eval_size: expected an integer >= 1, got -3"),
    ("evaluate eval_size 0", "evaluate_skills", lambda w: ["--model", w["teacher"], "--eval_size", "0"],
     "argument --eval_size: expected an integer >= 1, got 0"),
    ("evaluate a missing model", "evaluate_skills", lambda w: ["--model", f"{w['root']}/no_model"],
     lambda w: f"model path {str(w['root']) + '/no_model'!r} does not exist"),
    ("evaluate without --model", "evaluate_skills", lambda w: [], "the following arguments are required: --model"),
    ("report on a missing student", "report",
     lambda w: ["--teacher", w["teacher"], "--student", f"{w['root']}/no_student"],
     lambda w: f"{w['root']}/no_student is not a folder"),
    ("export size 0", "export_lm_eval_task", lambda w: ["--output_dir", w["out"], "--size", "0"],
     "argument --size: expected an integer >= 1"),
    ("sweep alpha out of range", "sweep", lambda w: ["--teacher", w["teacher"], "--alphas", "2"],
     "Every alpha must be in [0, 1]"),
    ("sweep unknown loss", "sweep", lambda w: ["--teacher", w["teacher"], "--losses", "kl"], "Unknown loss(es)"),
    ("cache with no teacher_cache", "cache_teacher", lambda w: ["--teacher", w["teacher"], "--output_dir", w["out"]],
     "Set teacher_cache: <folder> in the config"),
    ("specialist negative learning rate", "train_specialist",
     lambda w: ["--output_dir", w["out"], "--final_dir", w["out"], "--learning_rate", "-1"],
     "Invalid training arguments: learning_rate must be >= 0"),
    ("specialist misspelled option", "train_specialist",
     lambda w: ["--output_dir", w["out"], "--lora_rnk", "8"], "unknown option(s) --lora_rnk (did you mean --lora_r?)"),
]


def run_case(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runpy_main(script, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("script, make_argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_clear_line(world, script, make_argv, words, capsys):
    code, out, err = run_case(script, make_argv(world), capsys)
    words = words(world) if callable(words) else words
    assert code == 1
    assert "Traceback" not in out + err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{script}: {words}"), last
    assert not os.path.exists(os.path.join(world["out"], "model.safetensors"))  # before any work was saved


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(world, capsys, monkeypatch, tmp_path):
    original = torch.save

    def full(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    code, out, err = run_case("distill_llm", [*distill(world), "--output_dir", tmp_path / "run",
                                              "--compare_hard_labels", "false", "--save_strategy", "steps",
                                              "--save_steps", "1"], capsys)
    assert code == 1 and "Traceback" not in out + err
    assert err.splitlines()[-1].startswith("distill_llm: The disk is full: saving ")
    assert "older checkpoints in" in err.splitlines()[-1]


def test_debug_flag_and_environment_variable_show_the_traceback(world, capsys, monkeypatch):
    argv = distill(world, "--learning_rate", "-1")
    code, _, err = run_case("distill_llm", [*argv, "--debug"], capsys)
    assert code == 1 and "Traceback" in err
    assert err.splitlines()[-1].startswith("distill_llm: Invalid DistillationConfig: learning_rate")
    monkeypatch.setenv("KD_LLM_DEBUG", "1")
    code, _, err = run_case("distill_llm", argv, capsys)
    assert "Traceback" in err


def test_a_bug_keeps_its_traceback():
    """Only kd_llm's own errors (and the library errors it knows) become one line; an error deep in a library
    that kd_llm does not explain is a bug to report, with its traceback."""
    try:
        {}["missing"]
    except KeyError as error:
        assert user_message(error) is None  # raised here, in a test, not by a kd_llm raise statement
    try:
        json.loads("{")
    except ValueError as error:
        assert user_message(error) is None
    assert user_message(OSError(errno.ENOSPC, "No space left", "/x/model.safetensors")).startswith(
        "the disk is full while writing /x/model.safetensors")


def test_the_message_is_the_last_line_under_accelerate_launch(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("KD_LLM_DEBUG", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines",
               "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(SCRIPTS / "distill_llm.py"), *distill(world, "--temprature", "2")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output and "CalledProcessError" not in output
    assert result.stderr.rstrip("\n").splitlines()[-1].startswith(
        "distill_llm: unknown option(s) --temprature (did you mean --temperature?)")
