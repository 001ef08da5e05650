"""`blip3o eval BENCH`: each runner reads its benchmark's files and writes exactly what the benchmark's scorer
reads, records its settings, resumes after a kill, shards over processes, and names bad input."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.cli import main
from blip3o.evals.run.judge import JUDGE_SYSTEM
from blip3o.evals.run.understanding import one_line

SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved debug model: every run loads the same weights (a preset is random each load)."""
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").save_pretrained(tmp_path_factory.mktemp("runners") / "debug-model")


@pytest.fixture
def calls(monkeypatch):
    """What the model was asked: the prompts of each generate call, the conversations of each chat call."""
    seen = {"generate": [], "chat": []}
    generate, chat = Blip3o.generate, Blip3o.chat

    def spy_generate(self, prompts, **kwargs):
        seen["generate"].append(list(prompts))
        return generate(self, prompts, **kwargs)

    def spy_chat(self, conversations, **kwargs):
        seen["chat"].append(conversations)
        return chat(self, conversations, **kwargs)

    monkeypatch.setattr(Blip3o, "generate", spy_generate)
    monkeypatch.setattr(Blip3o, "chat", spy_chat)
    return seen


def run(*args) -> int:
    return main(["eval", *map(str, args)])


def files(folder: Path) -> list[str]:
    """Every file under `folder`, as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def png(color, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def texts(conversation) -> str:
    (turn,) = conversation
    return "".join(part["text"] for part in turn["content"] if part["type"] == "text")


def image_count(conversation) -> int:
    (turn,) = conversation
    kinds = [part["type"] for part in turn["content"]]
    assert kinds[-1] == "text" and set(kinds[:-1]) <= {"image"}  # the images first, then the text
    return len(kinds) - 1


# ------------------------------------------------------------------ benchmark files, three items each

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


def geneval_file(folder: Path) -> Path:
    path = folder / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return path


def mme_folder(folder: Path) -> Path:
    """MME as distributed: artwork with images/ and questions_answers_YN/, count with both side by side."""
    root = folder / "MME_Benchmark_release_version"
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "images" / "10002.jpg").write_bytes(png((200, 40, 40)))
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork a painting? Please answer yes or no.\tYes\n"
        "Is this artwork a sculpture? Please answer yes or no.\tNo\n")
    (root / "count").mkdir()
    for n in (1, 2):
        (root / "count" / f"00000{n}.png").write_bytes(png((40, 40, 200)))
        (root / "count" / f"00000{n}.txt").write_text(f"Are there {n} dogs? Please answer yes or no.\tYes\n"
                                                      f"Are there {n + 2} dogs? Please answer yes or no.\tNo\n")
    return root


def wise_folder(folder: Path) -> Path:
    """WISE's data folder: its three files, four prompts."""
    data = folder / "data"
    data.mkdir()
    entries = {"cultural_common_sense.json": [(1, "Culture"), (2, "Culture")],
               "spatio-temporal_reasoning.json": [(401, "Time")], "natural_science.json": [(701, "Biology")]}
    for name, ids in entries.items():
        (data / name).write_text(json.dumps([
            {"Prompt": f"prompt {pid}", "Explanation": f"what prompt {pid} shows", "Category": category,
             "Subcategory": f"sub {pid}", "prompt_id": pid} for pid, category in ids], indent=1))
    return data


def vqav2_files(folder: Path) -> tuple[Path, Path]:
    images = folder / "test2015"
    images.mkdir()
    for image_id, color in ((9, (200, 0, 0)), (262144, (0, 200, 0))):
        (images / f"COCO_test2015_{image_id:012d}.jpg").write_bytes(png(color))
    questions = {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 9, "question": "What color is it?", "question_id": 90},
        {"image_id": 262144, "question": "Is it green?", "question_id": 262144000},
        {"image_id": 9, "question": "How many?", "question_id": 91}]}
    path = folder / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    path.write_text(json.dumps(questions))
    return path, images


def textvqa_files(folder: Path) -> tuple[Path, Path]:
    images = folder / "train_images"
    images.mkdir()
    for image_id in ("003a8ae2ef43b901", "0a0bc91825468c45"):
        (images / f"{image_id}.jpg").write_bytes(png((90, 90, 90)))
    data = {"dataset_name": "textvqa", "data": [
        {"question": "what is the brand?", "image_id": "003a8ae2ef43b901", "question_id": 34602, "answers": ["x"]},
        {"question": "WHAT year is it?", "image_id": "0a0bc91825468c45", "question_id": 34603, "answers": ["y"]},
        {"question": "what does it say?", "image_id": "003a8ae2ef43b901", "question_id": 34604, "answers": ["z"]}]}
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data))
    return path, images


def mmmu_rows(encode) -> list[dict]:
    """Three validation rows (two multiple-choice, one open with two images) and one dev row."""
    images = {f"image_{n}": None for n in range(1, 8)}
    return [
        {**images, "id": "validation_Art_1", "question": "<image 1> Which style is this?",
         "options": "['Baroque', 'Cubism', 'Pop art']", "question_type": "multiple-choice", "answer": "B",
         "image_1": encode(png((200, 0, 0)))},
        {**images, "id": "validation_Art_2", "question": "Which matches?",
         "options": "['<image 1>', '<image 2>']", "question_type": "multiple-choice", "answer": "A",
         "image_1": encode(png((0, 200, 0))), "image_2": encode(png((0, 0, 200)))},
        {**images, "id": "validation_Math_1", "question": "How far apart are <image 2> and <image 1>?",
         "options": "[]", "question_type": "open", "answer": "3",
         "image_1": encode(png((9, 9, 9))), "image_2": encode(png((99, 99, 99)))},
        {**images, "id": "dev_Art_1", "question": "<image 1> ?", "options": "['a', 'b']",
         "question_type": "multiple-choice", "answer": "A", "image_1": encode(png((5, 5, 5)))},
    ]


# ------------------------------------------------------------------ generation


def test_geneval_writes_a_folder_per_prompt_as_its_scorer_reads_them(checkpoint, tmp_path, calls):
    out = tmp_path / "geneval"
    assert run("geneval", "--data", geneval_file(tmp_path), "--out", out, "--model", checkpoint,
               "--num-images", 2, "--batch-size", 2) == 0
    samples = ["grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png"]
    assert files(out) == [*(f"{i:05d}/{name}" for i in range(3) for name in samples), "settings.json"]
    # what GenEval's evaluate_images.py reads: numbered folders, metadata.jsonl as one JSON object, \d+.png samples
    for index, line in enumerate(GENEVAL_LINES):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert all(re.match(r"\d+\.png", p.name) for p in (folder / "samples").iterdir())
        assert Image.open(folder / "grid.png").size == (64, 32)
    assert calls["generate"] == [[line["prompt"] for line in GENEVAL_LINES[:2]], [GENEVAL_LINES[2]["prompt"]]]
    settings = json.loads((out / "settings.json").read_text())
    assert {k: settings[k] for k in ("benchmark", "prompts", "num_images", "seed", "steps", "guidance", "sampler",
                                     "decoder_steps", "height", "width")} == {
        "benchmark": "geneval", "prompts": 3, "num_images": 2, "seed": 42, "steps": 4, "guidance": 3.0,
        "sampler": "euler", "decoder_steps": 4, "height": 32, "width": 32}  # the debug model's own settings
    # each prompt's images are those of generate([prompt], seed=42) alone
    model = Blip3o.from_pretrained(checkpoint)
    alone = model.generate([GENEVAL_LINES[2]["prompt"]], num_images=2, seed=42)
    assert Image.open(out / "00002" / "samples" / "0001.png").tobytes() == alone[1].tobytes()


def test_dpg_writes_a_2x2_grid_per_prompt_file_named_as_the_file(checkpoint, tmp_path):
    prompts = tmp_path / "dpg_bench" / "prompts"
    prompts.mkdir(parents=True)
    for name, text in (("0", "eight cabbages in a field"), ("1", "a red kite"), ("partiprompts7", "a blue cup\n")):
        (prompts / f"{name}.txt").write_text(text)
    out = tmp_path / "dpg"
    assert run("dpg", "--data", tmp_path / "dpg_bench", "--out", out, "--model", checkpoint) == 0
    assert files(out) == ["0.png", "1.png", "partiprompts7.png", "settings.json"]
    grid = Image.open(out / "partiprompts7.png")
    assert grid.size == (64, 64)  # 2x2 tiles of the decoder's 32 px
    images = Blip3o.from_pretrained(checkpoint).generate(["a blue cup"], num_images=4, seed=42)
    for k, (x, y) in enumerate(((0, 0), (32, 0), (0, 32), (32, 32))):  # the scorer's crops, in its order
        assert grid.crop((x, y, x + 32, y + 32)).tobytes() == images[k].tobytes()
    assert json.loads((out / "settings.json").read_text())["num_images"] == 4


def test_wise_writes_one_image_per_prompt_id(checkpoint, tmp_path, calls):
    out = tmp_path / "wise"
    assert run("wise", "--data", wise_folder(tmp_path), "--out", out, "--model", checkpoint) == 0
    assert files(out) == ["1.png", "2.png", "401.png", "701.png", "settings.json"]
    assert calls["generate"] == [["prompt 1", "prompt 2", "prompt 401", "prompt 701"]]  # --batch-size 4
    assert Image.open(out / "401.png").size == (32, 32)


# ------------------------------------------------------------------ WISE's judge


class JudgeStub(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: records each request, replies as `server.reply(prompt_text)` says."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][1]["content"][0]["text"]
        content = self.server.reply(re.search(r'PROMPT: "(.*)"', text).group(1))
        data = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeStub)
    server.seen, server.reply = [], lambda prompt: "Consistency: 2\nRealism: 1\n**Aesthetic Quality**: 0"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def asked_text(request: dict) -> str:
    """The user message's text of a request the stub recorded."""
    return request["body"]["messages"][1]["content"][0]["text"]


def judged_images(tmp_path: Path) -> tuple[Path, Path]:
    data, images = wise_folder(tmp_path), tmp_path / "wise"
    images.mkdir()
    for pid in (1, 2, 401, 701):
        (images / f"{pid}.png").write_bytes(png((pid % 255, 10, 10)))
    return data, images


def judge(server, data, images, *extra) -> int:
    return run("wise-judge", "--data", data, "--images", images, "--judge-url", f"http://127.0.0.1:"
               f"{server.server_address[1]}/v1", "--judge-model", "gpt-4o-2024-05-13", "--workers", 2, *extra)


def test_wise_judge_sends_the_official_request_and_writes_what_wise_scores(tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-key")
    data, images = judged_images(tmp_path)
    assert judge(judge_server, data, images, "--api-key-env", "JUDGE_KEY") == 0
    results = images / "Results"
    assert files(results) == sorted(f"{stem}_{kind}" for stem in ("cultural_common_sense", "natural_science",
                                                                   "spatio-temporal_reasoning")
                                    for kind in ("full_results.json", "scores_results.jsonl"))
    lines = (results / "cultural_common_sense_scores_results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [  # what Calculate.py reads, sorted by prompt_id
        {"prompt_id": pid, "Subcategory": f"sub {pid}", "consistency": 2.0, "realism": 1.0, "aesthetic_quality": 0.0}
        for pid in (1, 2)]
    (full,) = json.loads((results / "natural_science_full_results.json").read_text())
    assert full == {"prompt_id": 701, "prompt": "prompt 701", "key": "what prompt 701 shows",
                    "image_path": str(images / "701.png"),
                    "evaluation": "Consistency: 2\nRealism: 1\n**Aesthetic Quality**: 0"}
    assert len(judge_server.seen) == 4
    (request,) = [r for r in judge_server.seen if 'PROMPT: "prompt 401"' in asked_text(r)]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret-key"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4o-2024-05-13", 0.0, 2000)
    assert body["messages"][0] == {"role": "system", "content": [{"type": "text", "text": JUDGE_SYSTEM}]}
    text, image = body["messages"][1]["content"]
    assert text["text"].endswith('PROMPT: "prompt 401"\nEXPLANATION: "what prompt 401 shows"\nPlease strictly '
                                 "adhere to the scoring criteria and follow the template format when providing "
                                 "your results.")
    assert "**Consistency (0-2):**" in text["text"] and "Aesthetic Quality: 0" in text["text"]
    prefix = "data:image/png;base64,"
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix):]) == (images / "401.png").read_bytes()
    # a rerun judges only what the scores files lack
    scores = results / "cultural_common_sense_scores_results.jsonl"
    scores.write_text(lines[0] + "\n")
    assert judge(judge_server, data, images, "--api-key-env", "JUDGE_KEY") == 0
    assert len(judge_server.seen) == 5 and 'PROMPT: "prompt 2"' in asked_text(judge_server.seen[-1])
    assert scores.read_text().splitlines() == lines


def test_wise_judge_retries_unreadable_replies_and_names_what_it_could_not_score(tmp_path, judge_server, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    data, images = judged_images(tmp_path)
    judge_server.reply = lambda prompt: "no scores here" if prompt == "prompt 2" else "2\n2\n1"
    assert judge(judge_server, data, images) == 1
    assert "1 images got no scores in 3 tries (prompt ids 2)" in capsys.readouterr().err
    asked = [asked_text(r) for r in judge_server.seen]
    assert sum('PROMPT: "prompt 2"' in text for text in asked) == 3 and len(asked) == 6
    lines = (images / "Results" / "cultural_common_sense_scores_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in lines] == [1]  # the bare 3-line reply read in order
    assert json.loads(lines[0])["aesthetic_quality"] == 1.0
    monkeypatch.delenv("OPENAI_API_KEY")
    assert judge(judge_server, data, images) == 2
    assert "the environment variable OPENAI_API_KEY is not set" in capsys.readouterr().err


# ------------------------------------------------------------------ understanding


def test_mme_writes_eval_tool_files_from_lmms_evals_prompts(checkpoint, tmp_path, calls):
    out = tmp_path / "mme"
    assert run("mme", "--data", mme_folder(tmp_path), "--out", out, "--model", checkpoint, "--max-new-tokens", 3,
               "--batch-size", 4) == 0
    assert files(out) == ["artwork.txt", "count.txt", "parts/00000000.json", "parts/00000004.json", "settings.json"]
    asked = [conversation for call in calls["chat"] for conversation in call]
    assert len(calls["chat"]) == 6  # the blip3o protocol asks one question a call
    assert [texts(c) for c in asked] == [  # task by task in MME's order (count before artwork), image by image
        "Are there 1 dogs?" + SHORT, "Are there 3 dogs?" + SHORT, "Are there 2 dogs?" + SHORT,
        "Are there 4 dogs?" + SHORT, "Is this artwork a painting?" + SHORT, "Is this artwork a sculpture?" + SHORT]
    assert all(image_count(c) == 1 for c in asked)
    rows = [line.split("\t") for line in (out / "count.txt").read_text().splitlines()]
    assert [row[:3] for row in rows] == [["000001.png", "Are there 1 dogs? Please answer yes or no.", "Yes"],
                                         ["000001.png", "Are there 3 dogs? Please answer yes or no.", "No"],
                                         ["000002.png", "Are there 2 dogs? Please answer yes or no.", "Yes"],
                                         ["000002.png", "Are there 4 dogs? Please answer yes or no.", "No"]]
    answers = {}
    for part in sorted((out / "parts").iterdir()):
        answers.update(json.loads(part.read_text()))
    assert [row[3] for row in rows] == [one_line(answers[f"count/00000{n}/{k}"]) for n in (1, 2) for k in (1, 2)]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["protocol"]["name"] == "blip3o" and settings["protocol"]["jpeg_round_trip"] is True
    assert (settings["max_new_tokens"], settings["do_sample"], settings["questions"]) == (3, False, 6)


def test_vqav2_and_textvqa_write_evalai_predictions(checkpoint, tmp_path, calls):
    questions, images = vqav2_files(tmp_path)
    out = tmp_path / "vqav2"
    assert run("vqav2", "--data", questions, "--images", images, "--out", out, "--model", checkpoint,
               "--protocol", "stock", "--max-new-tokens", 2) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [90, 262144000, 91]
    assert all(isinstance(p["answer"], str) and p["answer"] == p["answer"].strip() for p in predictions)
    (call,) = calls["chat"]  # --protocol stock: the step's 3 questions in one call
    assert [texts(c) for c in call] == ["What color is it?" + SHORT, "Is it green?" + SHORT, "How many?" + SHORT]
    questions, images = textvqa_files(tmp_path)
    out = tmp_path / "textvqa"
    assert run("textvqa", "--data", questions, "--images", images, "--out", out, "--model", checkpoint,
               "--max-new-tokens", 2) == 0
    assert [p["question_id"] for p in json.loads((out / "predictions.json").read_text())] == [34602, 34603, 34604]
    asked = [texts(c) for call in calls["chat"][1:] for c in call]
    assert asked == ["What is the brand?" + SHORT, "What year is it?" + SHORT, "What does it say?" + SHORT]


def test_mmmu_reads_json_or_parquet_and_writes_the_responses_file(checkpoint, tmp_path, calls):
    rows = mmmu_rows(lambda data: base64.b64encode(data).decode())
    (tmp_path / "mmmu.json").write_text(json.dumps(rows))
    out = tmp_path / "from_json"
    assert run("mmmu", "--data", tmp_path / "mmmu.json", "--out", out, "--model", checkpoint,
               "--max-new-tokens", 2) == 0
    responses = json.loads((out / "responses.json").read_text())
    assert list(responses) == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]  # dev_ left out
    key = [json.loads(line) for line in (out / "answer_key.jsonl").read_text().splitlines()]
    assert key == [{k: row[k] for k in ("id", "question_type", "answer", "options")} for row in rows[:3]]
    asked = [c for call in calls["chat"] for c in call]
    assert texts(asked[0]) == ("<image 1> Which style is this?\nA. Baroque\nB. Cubism\nC. Pop art\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert texts(asked[2]) == "How far apart are <image 2> and <image 1>?\n\n" + SHORT.strip()
    assert [image_count(c) for c in asked] == [1, 2, 2]
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "MMMU"
    rows = mmmu_rows(lambda data: {"bytes": data, "path": "x.png"})  # as MMMU's parquet files hold images
    for subject in ("Art", "Math"):
        (folder / subject).mkdir(parents=True)
        parquet.write_table(pyarrow.Table.from_pylist([r for r in rows if f"_{subject}_" in r["id"]]),
                            folder / subject / "validation-00000-of-00001.parquet")
    out = tmp_path / "from_parquet"
    assert run("mmmu", "--data", folder, "--out", out, "--model", checkpoint, "--max-new-tokens", 2) == 0
    assert json.loads((out / "responses.json").read_text()) == responses


# ------------------------------------------------------------------ resuming, settings, processes


def test_a_rerun_after_a_kill_does_only_what_is_missing(checkpoint, tmp_path, calls):
    out = tmp_path / "geneval"
    args = ["geneval", "--data", geneval_file(tmp_path), "--out", out, "--model", checkpoint, "--num-images", 2]
    assert run(*args) == 0
    before = {name: (out / name).read_bytes() for name in files(out)}
    # killed while writing prompt 1: its folder is not there yet, its temporary is
    (out / "00001").rename(out / ".00001.tmp-killed")
    (out / ".00001.tmp-killed" / "grid.png").unlink()
    calls["generate"].clear()
    assert run(*args) == 0
    assert calls["generate"] == [[GENEVAL_LINES[1]["prompt"]]]
    assert {name: (out / name).read_bytes() for name in files(out)} == before  # the temporary is gone too

    out = tmp_path / "mme"
    args = ["mme", "--data", mme_folder(tmp_path), "--out", out, "--model", checkpoint, "--max-new-tokens", 2,
            "--batch-size", 1]
    assert run(*args) == 0
    before = {name: (out / name).read_bytes() for name in files(out)}
    (out / "parts" / "00000002.json").rename(out / "parts" / ".00000002.json.killed.tmp")
    calls["chat"].clear()
    assert run(*args) == 0
    assert [texts(c) for call in calls["chat"] for c in call] == ["Are there 2 dogs?" + SHORT]
    assert {name: (out / name).read_bytes() for name in files(out)} == before


def test_a_rerun_with_other_settings_into_the_same_folder_is_refused(checkpoint, tmp_path, capsys):
    args = ["geneval", "--data", geneval_file(tmp_path), "--out", tmp_path / "out", "--model", checkpoint,
            "--num-images", 1]
    assert run(*args) == 0
    assert run(*args, "--seed", 7) == 2
    assert "holds outputs made with other settings (seed: 42 there, 7 now" in capsys.readouterr().err
    assert run(*args, "--batch-size", 3) == 0  # how fast, not what: allowed


def torchrun(args: list, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29600 + os.getpid() % 1000), "-m", "blip3o.cli", "eval", *map(str, args)]
    subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)


def test_two_processes_write_the_files_one_process_writes(checkpoint, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same kernels, the same floating-point sums
    try:
        geneval = ["geneval", "--data", geneval_file(tmp_path), "--model", checkpoint, "--num-images", 2]
        mme = ["mme", "--data", mme_folder(tmp_path), "--model", checkpoint, "--max-new-tokens", 3, "--batch-size", 1]
        for args in (geneval, mme):
            assert run(*args, "--out", tmp_path / f"one-{args[0]}") == 0
            torchrun([*args, "--out", tmp_path / f"two-{args[0]}"], 2)
    finally:
        torch.set_num_threads(threads)
    for name in ("geneval", "mme"):
        one, two = tmp_path / f"one-{name}", tmp_path / f"two-{name}"
        assert files(one) == files(two)
        for file in files(one):
            assert (one / file).read_bytes() == (two / file).read_bytes(), file


# ------------------------------------------------------------------ bad input


def bad_geneval(tmp_path):
    path = geneval_file(tmp_path)
    path.write_text(path.read_text().replace('"prompt": "a photo of a cat', '"prompt" "a photo of a cat'))
    return ["geneval", "--data", path], f"{path}:2: not valid JSON"


def bad_mme(tmp_path):
    root = mme_folder(tmp_path)
    (root / "count" / "000002.txt").write_text("Are there 2 dogs?\tYes\nAre there 4 dogs? No\n")
    return ["mme", "--data", root], f"{root / 'count' / '000002.txt'}:2: expected a question, a tab, then Yes or No"


def bad_dpg(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "3.txt").write_text("  \n")
    return ["dpg", "--data", tmp_path], f"{tmp_path / 'prompts' / '3.txt'}: the prompt is empty"


def bad_wise(tmp_path):
    data = wise_folder(tmp_path)
    (data / "natural_science.json").write_text('[\n  {"prompt_id": 701,\n  "Prompt": }\n]')
    return ["wise", "--data", data], f"{data / 'natural_science.json'}:3: not valid JSON"


def bad_vqav2(tmp_path):
    questions, images = vqav2_files(tmp_path)
    (images / "COCO_test2015_000000262144.jpg").unlink()
    return (["vqav2", "--data", questions, "--images", images],
            f"{questions}: question 262144000 asks about image 262144, which is not in --images")


def bad_textvqa(tmp_path):
    questions, images = textvqa_files(tmp_path)
    data = json.loads(questions.read_text())
    del data["data"][1]["question_id"]
    questions.write_text(json.dumps(data))
    return ["textvqa", "--data", questions, "--images", images], f"{questions}: data[1] needs 'question_id'"


def bad_mmmu(tmp_path):
    rows = mmmu_rows(lambda data: base64.b64encode(data).decode())
    rows[1]["options"] = "['<image 1>', "
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["mmmu", "--data", tmp_path / "rows.jsonl"], f"{tmp_path / 'rows.jsonl'}: validation_Art_2: options"


def missing_file(tmp_path):
    return ["geneval", "--data", tmp_path / "nowhere.jsonl"], f"{tmp_path / 'nowhere.jsonl'}: no such file"


@pytest.mark.parametrize("case", [bad_geneval, bad_mme, bad_dpg, bad_wise, bad_vqav2, bad_textvqa, bad_mmmu,
                                  missing_file])
def test_bad_benchmark_files_exit_2_naming_the_file_and_line(case, tmp_path, capsys):
    args, message = case(tmp_path)
    assert run(*args, "--out", tmp_path / "out", "--model", "debug") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything loads or is written
