"""WISE's judge: each image sent with its prompt and WISE's judging prompt to an OpenAI-compatible vision endpoint,
and the three scores of each reply written where WISE's Calculate.py reads them.

    OUT/<file>_scores_results.jsonl   a line per image: prompt_id, Subcategory, consistency, realism, aesthetic_quality
    OUT/<file>_full_results.json      [{prompt_id, prompt, key, image_path, evaluation}, ...]: the judge's replies

one pair per prompt file (<file> is its name without .json), sorted by prompt_id, as WISE's gpt_eval.py writes
them; then `python Calculate.py OUT/*_scores_results.jsonl --category all`. The request is gpt_eval.py's: its
system and user messages word for word (the scores are only comparable under them), the image as a base64 PNG
data URL, temperature 0, at most 2000 tokens; a reply whose three scores cannot be read is asked again, up to 3
times. Both files are rewritten atomically after each image, and a rerun judges only the prompt ids the scores
file lacks.
"""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import openai

from blip3o.cli.errors import BadInput
from blip3o.cli.terminal import progress
from blip3o.files import write_text

SCORE_KEYS = ("consistency", "realism", "aesthetic_quality")
ATTEMPTS = 3  # tries of one image whose reply lacks a score (or whose request failed after the client's retries)

JUDGE_SYSTEM = ("You are a professional Vincennes image quality audit expert, please evaluate the image quality "
                "strictly according to the protocol.")
# gpt_eval.py's user message, line by line (trailing spaces included); {prompt} and {explanation} are the entry's
JUDGE_LINES = (
    "Please evaluate strictly and return ONLY the three scores as requested.",
    "",
    "# Text-to-Image Quality Evaluation Protocol",
    "",
    "## System Instruction",
    "You are an AI quality auditor for text-to-image generation. Apply these rules with ABSOLUTE RUTHLESSNESS. Only "
    "images meeting the HIGHEST standards should receive top scores.",
    "",
    "**Input Parameters**  ",
    "- PROMPT: [User's original prompt to]  ",
    "- EXPLANATION: [Further explanation of the original prompt] ",
    "---",
    "",
    "## Scoring Criteria",
    "",
    "**Consistency (0-2):**  How accurately and completely the image reflects the PROMPT.",
    "* **0 (Rejected):**  Fails to capture key elements of the prompt, or contradicts the prompt.",
    "* **1 (Conditional):** Partially captures the prompt. Some elements are present, but not all, or not "
    "accurately.  Noticeable deviations from the prompt's intent.",
    "* **2 (Exemplary):**  Perfectly and completely aligns with the PROMPT.  Every single element and nuance of the "
    "prompt is flawlessly represented in the image. The image is an ideal, unambiguous visual realization of the "
    "given prompt.",
    "",
    "**Realism (0-2):**  How realistically the image is rendered.",
    "* **0 (Rejected):**  Physically implausible and clearly artificial. Breaks fundamental laws of physics or visual "
    "realism.",
    "* **1 (Conditional):** Contains minor inconsistencies or unrealistic elements.  While somewhat believable, "
    "noticeable flaws detract from realism.",
    "* **2 (Exemplary):**  Achieves photorealistic quality, indistinguishable from a real photograph.  Flawless "
    "adherence to physical laws, accurate material representation, and coherent spatial relationships. No visual "
    "cues betraying AI generation.",
    "",
    "**Aesthetic Quality (0-2):**  The overall artistic appeal and visual quality of the image.",
    "* **0 (Rejected):**  Poor aesthetic composition, visually unappealing, and lacks artistic merit.",
    "* **1 (Conditional):**  Demonstrates basic visual appeal, acceptable composition, and color harmony, but lacks "
    "distinction or artistic flair.",
    "* **2 (Exemplary):**  Possesses exceptional aesthetic quality, comparable to a masterpiece.  Strikingly "
    "beautiful, with perfect composition, a harmonious color palette, and a captivating artistic style. "
    "Demonstrates a high degree of artistic vision and execution.",
    "",
    "---",
    "",
    "## Output Format",
    "",
    "**Do not include any other text, explanations, or labels.** You must return only three lines of text, each "
    "containing a metric and the corresponding score, for example:",
    "",
    "**Example Output:**",
    "Consistency: 2",
    "Realism: 1",
    "Aesthetic Quality: 0",
    "",
    "---",
    "",
    "**IMPORTANT Enforcement:**",
    "",
    "Be EXTREMELY strict in your evaluation. A score of '2' should be exceedingly rare and reserved only for images "
    "that truly excel and meet the highest possible standards in each metric. If there is any doubt, downgrade the "
    "score.",
    "",
    "For **Consistency**, a score of '2' requires complete and flawless adherence to every aspect of the prompt, "
    "leaving no room for misinterpretation or omission.",
    "",
    "For **Realism**, a score of '2' means the image is virtually indistinguishable from a real photograph in terms "
    "of detail, lighting, physics, and material properties.",
    "",
    "For **Aesthetic Quality**, a score of '2' demands exceptional artistic merit, not just pleasant visuals.",
    "",
    "--- ",
    "Here are the Prompt and EXPLANATION for this evaluation:",
    'PROMPT: "{prompt}"',
    'EXPLANATION: "{explanation}"',
    "Please strictly adhere to the scoring criteria and follow the template format when providing your results.",
)
LABELLED_SCORE = re.compile(r"\*{0,2}(Consistency|Realism|Aesthetic Quality)\*{0,2}\s*:?\s*(\d)", re.IGNORECASE)
BARE_SCORE = re.compile(r"(?m)^\s*([0-2])\s*$")


def judge_messages(entry: dict, image_png: bytes) -> list[dict]:
    """The chat messages that ask the judge about one image."""
    text = "\n".join(JUDGE_LINES).format(prompt=entry["Prompt"], explanation=entry["Explanation"])
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    return [{"role": "system", "content": [{"type": "text", "text": JUDGE_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def parse_scores(reply: str) -> dict[str, float]:
    """The scores a reply gives, read as gpt_eval.py reads them: `Name: N` lines (bold or not, any case), else
    three bare lines of 0-2 in the order consistency, realism, aesthetic quality."""
    scores = {name.lower().replace(" ", "_"): float(value) for name, value in LABELLED_SCORE.findall(reply)}
    if scores:
        return scores
    bare = BARE_SCORE.findall(reply)
    return dict(zip(SCORE_KEYS, map(float, bare), strict=False)) if len(bare) >= 3 else {}


class Judge:
    """An OpenAI-compatible chat endpoint that judges one image at a time."""

    def __init__(self, url: str, model: str, api_key: str) -> None:
        self.url, self.model = url, model
        self.client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=3, timeout=300)

    def reply(self, messages: list[dict]) -> str:
        """The judge's reply; a setting the endpoint refuses (address, key, model) is bad input naming it."""
        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                           max_tokens=2000)
        except openai.APIConnectionError as e:
            raise BadInput(f"--judge-url {self.url}: no judge answers there ({e})") from e
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise BadInput(f"the judge at {self.url} refuses the API key ({e.status_code}): check --api-key-env's "
                           f"variable") from e
        except openai.NotFoundError as e:
            raise BadInput(f"the judge at {self.url} has no model {self.model!r} or no chat completions route "
                           f"({e.status_code}): check --judge-model and --judge-url (it ends in /v1)") from e
        return response.choices[0].message.content or ""

    def judge(self, entry: dict, image: Path) -> tuple[dict, dict] | None:
        """(scores record, full record) for one image, or None when no reply of ATTEMPTS gives all three scores."""
        messages = judge_messages(entry, image.read_bytes())
        for _ in range(ATTEMPTS):
            try:
                reply = self.reply(messages)
            except openai.APIError:  # refused or failed for this request only: tried again
                continue
            scores = parse_scores(reply)
            if set(SCORE_KEYS) <= scores.keys():
                return ({"prompt_id": entry["prompt_id"], "Subcategory": entry["Subcategory"],
                         **{key: scores[key] for key in SCORE_KEYS}},
                        {"prompt_id": entry["prompt_id"], "prompt": entry["Prompt"], "key": entry["Explanation"],
                         "image_path": str(image), "evaluation": reply})
        return None


class JudgedFile:
    """The two result files of one prompt file, and what they hold so far (by prompt_id)."""

    def __init__(self, out: Path, prompt_file: Path) -> None:
        self.scores_path = out / f"{prompt_file.stem}_scores_results.jsonl"
        self.full_path = out / f"{prompt_file.stem}_full_results.json"
        self.scores = {record["prompt_id"]: record for record in read_scores(self.scores_path)}
        self.full = {record["prompt_id"]: record for record in read_full(self.full_path)
                     if record["prompt_id"] in self.scores}

    def add(self, scores: dict, full: dict) -> None:
        self.scores[scores["prompt_id"]], self.full[full["prompt_id"]] = scores, full
        lines = "".join(json.dumps(self.scores[k], ensure_ascii=False) + "\n" for k in sorted(self.scores))
        write_text(self.scores_path, lines)
        write_text(self.full_path, json.dumps([self.full[k] for k in sorted(self.full)], ensure_ascii=False, indent=2))


def read_scores(path: Path) -> list[dict]:
    """The records of a scores file written before (none if there is none)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt_id"), int):
            raise BadInput(f"{path}:{number}: not a scores record (remove the file to judge its images again)")
        records.append(record)
    return records


def read_full(path: Path) -> list[dict]:
    """The records of a full-results file written before (none if there is none)."""
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON (remove it, and the scores file beside it, to judge "
                       f"their images again)") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) and "prompt_id" in r for r in records):
        raise BadInput(f"{path}: not a list of judged images (remove it, and the scores file beside it, to judge "
                       f"their images again)")
    return records


def pending(files: dict[Path, JudgedFile], by_file: dict[Path, list[dict]], images: Path) -> list[tuple[Path, dict]]:
    """(prompt file, entry) of every entry its result files lack; each needs its image IMAGES/<prompt_id>.png."""
    todo = [(path, entry) for path, entries in by_file.items() for entry in entries
            if entry["prompt_id"] not in files[path].scores]
    for _, entry in todo:
        image = images / f"{entry['prompt_id']}.png"
        if not image.is_file():
            raise BadInput(f"{image}: no image for prompt_id {entry['prompt_id']} (blip3o eval wise writes them)")
    return todo


def judge_all(judge: Judge, by_file: dict[Path, list[dict]], images: Path, out: Path, *,
              workers: int) -> tuple[int, list[int]]:
    """Judge, `workers` images at a time, every entry the result files lack; returns (images judged, prompt ids
    left without scores)."""
    files = {path: JudgedFile(out, path) for path in by_file}
    todo = pending(files, by_file, images)
    failed = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures: dict[Future, tuple[Path, dict]] = {
            pool.submit(judge.judge, entry, images / f"{entry['prompt_id']}.png"): (path, entry)
            for path, entry in todo}
        for future in progress(as_completed(futures), total=len(futures), desc="judge", unit="image"):
            path, entry = futures[future]
            result = future.result()
            if result is None:
                failed.append(entry["prompt_id"])
            else:
                files[path].add(*result)
    finally:
        pool.shutdown(cancel_futures=True)
    return len(todo) - len(failed), sorted(failed)


def run_judge(judge: Judge, by_file: dict[Path, list[dict]], images: Path, out: Path, *, workers: int) -> None:
    """`judge_all`, then say where the scores are; fails naming the images left without scores."""
    total = sum(len(entries) for entries in by_file.values())
    judged, failed = judge_all(judge, by_file, images, out, workers=workers)
    print(f"judged {judged} images; the scores of {total - len(failed)} of {total} are in {out}/")
    if failed:
        raise RuntimeError(f"{len(failed)} images got no scores in {ATTEMPTS} tries (prompt ids "
                           f"{', '.join(map(str, failed[:10]))}{', ...' if len(failed) > 10 else ''}): rerun to try "
                           f"them again")
    print(f"score them: blip3o eval score wise {out}/*_scores_results.jsonl (or WISE's Calculate.py, --category all)")
