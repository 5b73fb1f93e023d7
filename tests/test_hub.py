"""Pushing a distilled student to the Hub, against a local Hub server (tests/support/hub_server.py) on 127.0.0.1.

The student goes up through huggingface_hub 2.4 (LFS for weights, NDJSON commit), comes back through
``snapshot_download`` into a fresh cache, and must reload to the same logits with the same file checksums. Only the
allow-listed files travel, the token appears in no file and no log line, and failures (401, 403, 409, connection
refused, no token) raise one clear error and leave the local folder byte for byte as it was.
"""

import hashlib
import logging
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_llm.hub import HubPushError, is_pushable, push_output_folder, select_files_to_push
from kd_llm.training import DistillationConfig, DistillationTrainer
from tests.conftest import tiny_llama
from tests.support.hub_server import FakeHub

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_kdLLMtestTOKEN0123456789abcdefXYZ"
USER = "alice"
CARD = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# Distilled date-arithmetic student\n"
# What a finished run leaves in its output folder besides the student, and must never reach the Hub.
FORBIDDEN = ("training_args.bin", "distillation_projections.safetensors", "checkpoint-2/optimizer.pt",
             "checkpoint-2/model.safetensors", "hard_label_baseline/model.safetensors", "teacher/model.safetensors",
             ".cache/huggingface/download/model.safetensors.metadata")


def checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def point_hub_at(monkeypatch, url: str) -> None:
    """huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET into constants at import: patch both."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub({TOKEN: USER}).start()
    point_hub_at(monkeypatch, server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # tests/conftest.py sets 1 for every other test
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # plain LFS: what the local server speaks
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual way to hand a token over, instead of --hub_token
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, char_tokenizer, date_dataset):
    """A distilled tiny student saved like a finished run: student, tokenizer, card, report, plots, results, and
    the files that must stay local (training_args.bin, a checkpoint, projections, baseline, teacher, cache)."""
    folder = tmp_path_factory.mktemp("run")
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    config = DistillationConfig(output_dir=str(folder), max_steps=2, per_device_train_batch_size=8,
                                learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none",
                                use_cpu=True, disable_tqdm=True, seed=0, alpha=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2), teacher_model=teacher, args=config,
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    trainer.train()
    trainer.save_model(str(folder))
    (folder / "README.md").write_text(CARD)
    (folder / "report.md").write_text("# Report\n| model | EM |\n")
    (folder / "report.json").write_text('{"schema_version": 1}')
    (folder / "results.json").write_text('{"steps": 2}')
    (folder / "plots").mkdir()
    (folder / "plots" / "training_losses.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    save_file({"proj.0.weight": torch.randn(48, 32)}, folder / "distillation_projections.safetensors")
    for sub, model in (("hard_label_baseline", trainer.model), ("teacher", teacher)):
        model.save_pretrained(folder / sub)
    (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (folder / FORBIDDEN[-1]).write_text("cache")
    assert all((folder / name).is_file() for name in FORBIDDEN)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.tensor([date_dataset[0]["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids).logits
    return folder, input_ids, logits


@pytest.mark.parametrize("path, pushable", [
    ("model.safetensors", True), ("model-00001-of-00002.safetensors", True), ("model.safetensors.index.json", True),
    ("config.json", True), ("tokenizer.json", True), ("README.md", True), ("report.md", True),
    ("plots/training_losses.png", True), ("plots/sub/x.png", False), ("plots/x.svg", False),
    ("training_args.bin", False), ("optimizer.pt", False), ("distillation_projections.safetensors", False),
    ("checkpoint-2/model.safetensors", False), ("hard_label_baseline/config.json", False),
    ("teacher/model.safetensors", False), (".cache/huggingface/config.json", False), ("pytorch_model.bin", False),
    ("teacher_model.safetensors", False), ("hf_token.txt", False),
])
def test_allow_list(path, pushable):
    assert is_pushable(path) is pushable


def test_files_other_kd_llm_modules_write_stay_local():
    from kd_llm.features.hidden_states import PROJECTIONS_FILE
    from kd_llm.training.online import MUTUAL_TEACHER_FOLDER
    from kd_llm.training.self_distillation import EMA_TEACHER_FILE

    for path in (PROJECTIONS_FILE, EMA_TEACHER_FILE, f"{MUTUAL_TEACHER_FOLDER}/model.safetensors",
                 f"{MUTUAL_TEACHER_FOLDER}/config.json", "ema_teacher/model.safetensors"):
        assert not is_pushable(path), path


def test_the_report_files_are_pushed_and_the_baseline_is_not():
    artifacts = pytest.importorskip("kd_llm.report.artifacts")
    for name in (*artifacts.REPORT_FILES, artifacts.RESULTS_JSON):
        assert is_pushable(name), name
    assert not is_pushable(f"{artifacts.BASELINE_DIR}/model.safetensors")


def test_selection_is_the_student_tokenizer_card_report_and_plots(run_folder):
    folder, _, _ = run_folder
    selected = set(select_files_to_push(folder))
    must = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "report.md",
            "report.json", "results.json", "plots/training_losses.png"}
    assert must <= selected and not selected & set(FORBIDDEN)
    top_level = {p.name for p in folder.iterdir() if p.is_file()}
    assert selected == (top_level - {"training_args.bin", "distillation_projections.safetensors"}) | {
        "plots/training_losses.png"}


def test_push_download_reload_roundtrip(hub, run_folder, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    folder, input_ids, logits = run_folder
    before = checksums(folder)

    result = push_output_folder(folder, f"{USER}/date-student")

    assert result.repo_id == f"{USER}/date-student" and result.commit_oid in result.commit_url
    assert set(result.files) == set(select_files_to_push(folder))
    on_hub = hub.files(f"{USER}/date-student")
    assert set(on_hub) == set(result.files) | {".gitattributes"}
    assert not set(on_hub) & set(FORBIDDEN)
    # Weights and plots went through the LFS batch/upload/verify flow, JSON as regular files in the commit.
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in hub.lfs_uploads
    assert hashlib.sha256((folder / "config.json").read_bytes()).hexdigest() not in hub.lfs_uploads

    snapshot = Path(snapshot_download(f"{USER}/date-student", cache_dir=tmp_path / "fresh-cache"))
    downloaded = checksums(snapshot)
    downloaded.pop(".gitattributes")
    assert downloaded == {name: digest for name, digest in before.items() if name in result.files}
    reloaded = AutoModelForCausalLM.from_pretrained(snapshot).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert tokenizer("add:2020-02-28,3")["input_ids"] == AutoTokenizer.from_pretrained(folder)(
        "add:2020-02-28,3")["input_ids"]

    assert checksums(folder) == before  # pushing only reads
    # The token was sent (as a header, to the local Hub only) and nowhere else: no file, no log line, no output.
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert not any(TOKEN.encode() in content for content in on_hub.values())
    assert "HTTP Request" in caplog.text and "Pushing" in caplog.text  # the logs were captured
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_pushing_the_same_folder_again_commits_on_top(hub, run_folder):
    folder, _, _ = run_folder
    first = push_output_folder(folder, f"{USER}/again")
    second = push_output_folder(folder, f"{USER}/again", commit_message="Same files")
    assert first.commit_oid == second.commit_oid  # unchanged files: huggingface_hub skips the empty commit
    assert hub.files(f"{USER}/again") == hub.files(f"{USER}/again", first.commit_oid)


def copy_minimal_run(source: Path, target: Path, card: str = CARD) -> Path:
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    (target / "README.md").write_text(card)
    return target


def test_a_file_holding_the_token_is_refused_before_any_request(hub, run_folder, tmp_path):
    folder = copy_minimal_run(run_folder[0], tmp_path / "leaky", card=CARD + f"token: {TOKEN}\n")
    before = checksums(folder)
    with pytest.raises(HubPushError, match="README.md .* contain\\(s\\) your Hub token") as error:
        push_output_folder(folder, f"{USER}/leaky")
    assert TOKEN not in str(error.value)
    assert hub.requests == [] and checksums(folder) == before


def test_no_token_is_a_clear_error_before_any_request(hub, run_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="No Hugging Face token found.*hf auth login.*HF_TOKEN"):
        push_output_folder(run_folder[0], f"{USER}/x")
    assert hub.requests == []


def test_a_run_without_a_card_is_pushable_with_a_warning(run_folder, tmp_path, caplog):
    folder = copy_minimal_run(run_folder[0], tmp_path / "no-card")
    (folder / "README.md").unlink()
    assert select_files_to_push(folder) == ["config.json", "model.safetensors"]
    assert "has no model card (README.md)" in caplog.text and "scripts/report.py" in caplog.text


def test_a_folder_without_a_student_is_refused(tmp_path):
    (tmp_path / "README.md").write_text(CARD)
    with pytest.raises(HubPushError, match="holds no saved student"):
        push_output_folder(tmp_path, f"{USER}/x", token=TOKEN)
    with pytest.raises(HubPushError, match="does not exist"):
        push_output_folder(tmp_path / "missing", f"{USER}/x", token=TOKEN)
    with pytest.raises(HubPushError, match="not a valid repository id"):
        push_output_folder(tmp_path, "alice/has space", token=TOKEN)


@pytest.mark.parametrize("failure, expected", [
    ("bad_token", r"rejected the token \(401 Unauthorized\).*hf auth login"),
    ("token_revoked_mid_push", r"rejected the token \(401 Unauthorized\)"),
    ("other_namespace", r"may not write to 'bob/student' \(403 Forbidden\)"),
    ("conflict", r"conflict \(409.*Nothing was committed.*push again"),
    ("branch_moved", r"conflict \(412"),
    ("connection_refused", r"Could not reach the Hub at http://127\.0\.0\.1:\d+ \(ConnectError"),
])
def test_failures_are_clear_and_leave_the_folder_intact(hub, run_folder, monkeypatch, failure, expected, caplog):
    folder = run_folder[0]
    before = checksums(folder)
    repo_id, token = f"{USER}/student", None
    if failure == "bad_token":
        token = "hf_not_a_valid_token"
    elif failure == "token_revoked_mid_push":
        hub.fail(r"/preupload/", 401, "Invalid credentials in Authorization header")
    elif failure == "other_namespace":
        repo_id = "bob/student"
    elif failure == "conflict":
        hub.fail(r"/commit/", 409, "A commit has happened since. Please refresh and try again.")
    elif failure == "branch_moved":
        hub.fail(r"/commit/", 412, "A commit has happened since. Please refresh and try again.")
    elif failure == "connection_refused":
        point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")

    with pytest.raises(HubPushError, match=expected) as error:
        push_output_folder(folder, repo_id, token=token)

    message = str(error.value)
    assert f"Nothing in {str(folder)!r} was changed" in message
    assert f"scripts/push_to_hub.py --output_dir {folder} --hub_model_id {repo_id}" in message
    assert TOKEN not in message + caplog.text
    assert checksums(folder) == before
    if repo_id in hub.repos:  # created, but the failed push committed nothing
        assert set(hub.files(repo_id)) == {".gitattributes"}


def test_push_script(hub, run_folder, capsys, monkeypatch):
    folder = run_folder[0]
    script = str(ROOT / "scripts" / "push_to_hub.py")
    monkeypatch.setattr(sys, "argv", [script, "--output_dir", str(folder), "--hub_model_id", f"{USER}/cli"])
    runpy.run_path(script, run_name="__main__")
    assert f"files to {USER}/cli" in capsys.readouterr().out
    assert "model.safetensors" in hub.files(f"{USER}/cli")

    monkeypatch.setattr(sys, "argv", [script, "--output_dir", str(folder), "--hub_model_id", f"{USER}/cli",
                                      "--hub_token", "hf_wrong"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("push_to_hub: The Hub rejected the token (401") and "Traceback" not in err


def test_trainer_push_to_hub_pushes_the_allow_list_only(hub, tmp_path, char_tokenizer, date_dataset):
    """Trainer's own hooks (``push_to_hub=True``): the checkpoint push leaves optimizer and RNG states local, and
    the final push keeps the report's card instead of writing Trainer's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text(CARD)
    config = DistillationConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, save_strategy="steps",
                                save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, alpha=0.5,
                                push_to_hub=True, hub_model_id=f"{USER}/trainer-student", hub_token=TOKEN)
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                  teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1), args=config,
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    assert f"{USER}/trainer-student" in hub.repos  # created at Trainer init, before training
    trainer.train()
    repo = hub.repos[f"{USER}/trainer-student"]
    checkpoint_files = set(repo.commits[1][1])
    assert "model.safetensors" in checkpoint_files
    assert not checkpoint_files & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                                   "training_args.bin"}
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()  # they do exist locally

    result = trainer.push_to_hub()
    on_hub = hub.files(f"{USER}/trainer-student")
    assert set(on_hub) == set(result.files) | {".gitattributes"} and "training_args.bin" not in on_hub
    assert on_hub["README.md"].decode() == CARD == (out / "README.md").read_text()
    assert not any(TOKEN.encode() in content for content in on_hub.values())


def test_trainer_refuses_checkpoint_hub_strategies_before_training(hub, tmp_path, char_tokenizer, date_dataset):
    config = DistillationConfig(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True, alpha=1.0,
                                push_to_hub=True, hub_model_id=f"{USER}/x", hub_strategy="checkpoint")
    with pytest.raises(HubPushError, match="hub_strategy='checkpoint'.*optimizer states"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), args=config, train_dataset=date_dataset,
                            processing_class=char_tokenizer)
    assert hub.requests == []




RUN = ["--student_num_layers", "1", "--transfer_size", "0",  # the demo's pruned student, sized for the tiny teacher
       "--max_steps", "2", "--logging_steps", "1", "--train_size", "16", "--compare_hard_labels", "false",
       "--evaluate_skills", "false", "--disable_tqdm", "true", "--report_to", "none", "--measure_memory", "false"]


def test_distill_script_push_to_hub(hub, tiny_teacher_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill_llm

    out = tmp_path / "out"
    results = distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *RUN,
                                "--push_to_hub", "true", "--hub_model_id", f"{USER}/run", "--hub_token", TOKEN])
    on_hub = hub.files(f"{USER}/run")
    assert set(results["hub"]["files"]) == set(on_hub) - {".gitattributes"}
    # The report is written before the push, so the card, report and plots go up with the student.
    assert {"model.safetensors", "config.json", "tokenizer.json", "results.json", "README.md", "report.md",
            "report.json"} <= set(on_hub) and any(name.startswith("plots/") for name in on_hub)
    assert f"{USER}/run" in on_hub["README.md"].decode()  # the card names the repo it lives in
    assert on_hub["model.safetensors"] == (out / "model.safetensors").read_bytes()
    # The run's own training_args.bin (kept locally by Trainer) does not carry the token either.
    assert (out / "training_args.bin").is_file() and TOKEN.encode() not in (out / "training_args.bin").read_bytes()


def test_distill_script_checks_the_token_before_training(hub, tiny_teacher_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill_llm

    out = tmp_path / "out"
    with pytest.raises(HubPushError, match="401"):
        distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *RUN,
                          "--push_to_hub", "true", "--hub_model_id", f"{USER}/run", "--hub_token", "hf_wrong"])
    assert not (out / "model.safetensors").exists()  # failed before any training
