"""`lmms-eval --model blip3o`: lmms-eval finds the plugin through its entry point and runs a local task offline;
the three request types answer as lmms-eval's Instance API asks."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.protocols import PROTOCOLS

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

from lmms_eval.api.instance import Instance  # noqa: E402

from blip3o.evals.lmms import Blip3oLmms  # noqa: E402

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}
QUESTION = "What color is the image?\nAnswer the question using a single word or phrase."
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "<image>" + doc["question"]


def process_results(doc, results):
    return {"correct": float(results[0].strip().lower() == doc["answer"])}
'''
TASK_YAML = """task: blip3o_tiny
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: correct
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").save_pretrained(tmp_path_factory.mktemp("lmms") / "debug-model")


@pytest.fixture(scope="module")
def plugin(checkpoint):
    return Blip3oLmms(pretrained=str(checkpoint), device="cpu")


def reply(model, image, text, max_new_tokens):
    """What the model says to one image and question under the blip3o protocol, greedily."""
    protocol = PROTOCOLS["blip3o"]
    turn = [{"role": "user", "content": [{"type": "image", "image": protocol.prepare(image)},
                                         {"type": "text", "text": text}]}]
    (answer,) = model.chat([turn], max_new_tokens=max_new_tokens, do_sample=False, **protocol.options())
    return answer


def test_lmms_eval_finds_the_plugin_through_its_entry_point():
    from lmms_eval.models import get_model

    assert "blip3o" in {ep.name for ep in entry_points(group="lmms_eval.models")}
    assert get_model("blip3o") is Blip3oLmms


def test_lmms_eval_runs_a_local_task_offline_with_the_plugin(checkpoint, tmp_path):
    images = [Image.new("RGB", (32, 32), color) for color in COLORS.values()]
    rows = {"image": images, "question": [QUESTION] * 4, "answer": list(COLORS)}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "data")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "blip3o_tiny.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "blip3o", "--model_args",
               f"pretrained={checkpoint},device=cpu", "--tasks", "blip3o_tiny", "--include_path", str(tasks),
               "--limit", "3", "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = tmp_path.glob("out/*/*_results.json")
    assert "correct,none" in json.loads(results.read_text())["results"]["blip3o_tiny"]
    (samples,) = tmp_path.glob("out/*/*_samples_blip3o_tiny.jsonl")
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [s["doc_id"] for s in logged] == [0, 1, 2]  # --limit 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run: the same kernels, the same sums
    try:
        model = Blip3o.from_pretrained(checkpoint)
        expected = [reply(model, images[s["doc_id"]], QUESTION, max_new_tokens=4) for s in logged]
    finally:
        torch.set_num_threads(threads)
    # the plugin's reply: the image first, then the text without <image>, greedy, at most the task's 4 tokens
    assert [s.get("resps", s["filtered_resps"]) for s in logged] == expected  # the log drops resps when equal
    assert all(s["input"] == "<image>" + QUESTION for s in logged)


def request(kind: str, arguments: tuple, index: int = 0) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=index,
                    metadata={"task": "colors", "doc_id": arguments[-3], "repeats": 1})


def visuals(doc):
    return [doc["image"]]


def test_generate_until_cuts_at_the_tasks_stop_strings(plugin):
    docs = [{"image": Image.new("RGB", (32, 32), color)} for color in COLORS.values()]
    plugin.task_dict = {"colors": {"test": docs}}
    free = [request("generate_until", ("<image>" + QUESTION, {"max_new_tokens": 6}, visuals, i, "colors", "test"), i)
            for i in range(2)]
    replies = plugin.generate_until(free)
    assert replies == [reply(plugin.model, docs[i]["image"], QUESTION, 6) for i in range(2)]
    stop = replies[0][len(replies[0]) // 2]  # a character of the free reply: the reply ends before it
    cut = plugin.generate_until([request("generate_until", (QUESTION, {"max_new_tokens": 6, "until": [stop, "\n\n"]},
                                                            visuals, 0, "colors", "test"))])
    assert cut == [replies[0].split(stop)[0]]


def test_generate_until_multi_round_asks_each_round_the_task_gives(plugin):
    docs = [{"image": Image.new("RGB", (32, 32), COLORS["blue"])}]
    plugin.task_dict = {"colors": {"test": docs}}
    rounds = []

    def next_round(doc, previous_output, round_idx, previous_round_info):
        rounds.append((list(previous_output), round_idx, previous_round_info))
        text = f"And after {previous_output[-1]!r}?"
        return [doc["image"]], text, round_idx == 3, previous_output, {"round": round_idx}

    (replies,) = plugin.generate_until_multi_round([Instance(
        request_type="generate_until_multi_round", idx=0, metadata={"task": "colors", "doc_id": 0, "repeats": 1},
        arguments=(QUESTION, {"max_new_tokens": 3, "until": ["\n"]}, visuals, next_round, 0, "colors", "test"))])
    first = reply(plugin.model, docs[0]["image"], QUESTION, 3)
    second = reply(plugin.model, docs[0]["image"], f"And after {first!r}?", 3)
    assert replies[:2] == [first, second] and len(replies) == 3
    assert rounds == [([first], 1, None), ([first, second], 2, {"round": 1}), (replies, 3, {"round": 2})]


def written_reply(plugin, turn: list[dict], continuation: str) -> tuple[float, bool]:
    """(log-probability, greedy) of `continuation` read off one pass over the conversation with the reply written
    in as the assistant's message, by the chat template."""
    backbone, protocol = plugin.model.backbone, PROTOCOLS["blip3o"]
    bounds = {"min_pixels": protocol.min_pixels, "max_pixels": protocol.max_pixels}
    context = backbone.inputs([turn], **bounds)["input_ids"].shape[1]
    full = backbone.inputs([[*turn, {"role": "assistant", "content": continuation}]], **bounds)
    with torch.no_grad():
        logprobs = torch.log_softmax(backbone.model(**full).logits.float(), dim=-1)[0]  # (L, V)
    tokens = backbone.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    assert full["input_ids"][0, context:context + len(tokens)].tolist() == tokens
    rows = logprobs[context - 1:context - 1 + len(tokens)]  # each row predicts the next token
    return (sum(row[token].item() for row, token in zip(rows, tokens, strict=True)),
            rows.argmax(-1).tolist() == tokens)


def test_loglikelihood_is_the_continuations_log_probability_as_the_reply(plugin):
    image = Image.new("RGB", (32, 32), COLORS["red"])
    plugin.task_dict = {"colors": {"test": [{"image": image}]}}
    turn = [{"role": "user", "content": [{"type": "image", "image": PROTOCOLS["blip3o"].prepare(image)},
                                         {"type": "text", "text": QUESTION}]}]
    greedy = reply(plugin.model, image, QUESTION, max_new_tokens=1)  # one token, whose text reads back as it
    continuations = ["red", "dark red", greedy]
    scores = plugin.loglikelihood([request("loglikelihood", ("<image>" + QUESTION, c, visuals, 0, "colors", "test"), i)
                                   for i, c in enumerate(continuations)])
    for continuation, (logprob, is_greedy) in zip(continuations, scores, strict=True):
        expected, expected_greedy = written_reply(plugin, turn, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4) and is_greedy == expected_greedy
    assert scores[2][1] is True  # what greedy decoding says is greedy
