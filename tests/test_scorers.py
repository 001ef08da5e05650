"""The benchmark scorers on files in each benchmark's own format, against figures worked out by hand, and their
`blip3o eval score` commands (--json, bad input exit 2)."""

import json
import random

import pytest

from blip3o.cli import main
from blip3o.evals.score.dpg import score_dpg
from blip3o.evals.score.geneval import score_geneval
from blip3o.evals.score.inputs import BadScoreInput
from blip3o.evals.score.mme import COGNITION, PERCEPTION, parse_yes_no, score_mme, score_task
from blip3o.evals.score.mmmu import (
    check_open,
    fallback_rng,
    parse_multi_choice,
    parse_open,
    score_mmmu,
)
from blip3o.evals.score.vqa import (
    normalise_textvqa,
    normalise_words,
    score_vqa,
    strip_punctuation,
    textvqa_accuracy,
    vqa_accuracy,
)
from blip3o.evals.score.wise import score_wise


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run_json(capsys, *argv):
    """`blip3o eval score ... --json`: its exit code 0 and its one JSON object."""
    assert main(["eval", "score", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def run_bad(capsys, *argv):
    """`blip3o eval score ...` on bad input: exit 2 and its error line."""
    assert main(["eval", "score", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_eval_score_is_a_group_of_a_command_per_benchmark(capsys):
    assert main(["eval", "score", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(bench in out for bench in ("geneval", "dpg", "wise", "mme", "vqa", "mmmu"))
    assert main(["eval", "--help"]) == 0
    assert "score" in capsys.readouterr().out
    assert main(["eval", "score"]) == 2  # a group needs its target


# ------------------------------------------------------------------ MME


def test_mme_reads_yes_and_no_as_the_eval_tool_does():
    assert parse_yes_no("Yes") == "yes" and parse_yes_no("no") == "no"
    assert parse_yes_no("Yes, there is a train.") == "yes"
    assert parse_yes_no(" no.") == "no"  # within the first four characters
    assert parse_yes_no("Not at all") == "no" and parse_yes_no("nope") == "no"
    assert parse_yes_no("There is no train") == "other"  # "no" only after the first four characters
    assert parse_yes_no("y") == "other" and parse_yes_no("") == "other"


MME_IMAGES = [  # image, (answer, prediction) of its two questions
    ("a.jpg", ("Yes", "Yes"), ("No", "No")),  # both right
    ("b.jpg", ("Yes", "yes"), ("No", "yes, it is")),  # the two answers disagree, one prediction right
    ("c.jpg", ("No", "The image shows a cat"), ("Yes", "Yes.")),  # an unreadable prediction counts wrong
]


def mme_task_text(images) -> str:
    return "".join(f"{image}\tIs it so? Please answer yes or no.\t{answer}\t{prediction}\n"
                   for image, *pairs in images for answer, prediction in pairs)


def write_mme(folder, existence=MME_IMAGES):
    folder.mkdir()
    for task in PERCEPTION + COGNITION:  # every other task answered all right: 200
        images = existence if task == "existence" else [("x.png", ("Yes", "yes"), ("No", "no"))]
        (folder / f"{task}.txt").write_text(mme_task_text(images))
    return folder


def test_mme_task_scores_acc_plus_acc_plus(tmp_path):
    path = tmp_path / "existence.txt"
    path.write_text(mme_task_text(MME_IMAGES))
    task = score_task(path)
    assert (task.acc, task.acc_plus, task.other) == (4 / 6, 1 / 3, 1)
    assert task.score == pytest.approx(100 * 4 / 6 + 100 / 3)


def test_mme_sums_perception_and_cognition(tmp_path, capsys):
    folder = write_mme(tmp_path / "mme")
    result = score_mme(folder)
    assert result.perception == pytest.approx(100 * 4 / 6 + 100 / 3 + 9 * 200)
    assert result.cognition == 4 * 200
    printed = run_json(capsys, "mme", str(folder))
    assert printed == {"perception": pytest.approx(1900.0), "cognition": 800.0,
                       "tasks": {task: pytest.approx(100.0 if task == "existence" else 200.0)
                                 for task in PERCEPTION + COGNITION}}
    assert main(["eval", "score", "mme", str(folder)]) == 0
    assert "perception total" in capsys.readouterr().out


def test_mme_bad_input_names_file_and_line(tmp_path, capsys):
    folder = write_mme(tmp_path / "mme")
    with (folder / "count.txt").open("a") as f:
        f.write("y.png\tIs it so?\tYes\n")  # no prediction
    assert f"{folder / 'count.txt'}:3: needs 4 tab-separated fields" in run_bad(capsys, "mme", str(folder))
    (folder / "count.txt").write_text(mme_task_text([("y.png", ("Maybe", "yes"), ("No", "no"))]))
    assert "count.txt:1: the answer (field 3) must be Yes or No" in run_bad(capsys, "mme", str(folder))
    (folder / "count.txt").unlink()
    assert "missing count.txt" in run_bad(capsys, "mme", str(folder))


def test_mme_refuses_a_pair_split_across_images(tmp_path):
    path = tmp_path / "color.txt"
    path.write_text(mme_task_text([("a.jpg", ("Yes", "yes"))]) + mme_task_text([("b.jpg", ("No", "no"))]))
    with pytest.raises(BadScoreInput, match="color.txt:1-2: consecutive lines must be the two questions"):
        score_task(path)


# ------------------------------------------------------------------ VQA


def test_vqa_normalisation_steps():
    assert strip_punctuation("yes!") == "yes "  # a mark beside no space becomes a space
    assert strip_punctuation("red, white") == "red white"  # a mark beside a space goes
    assert strip_punctuation("1,000 (one)") == "1000 one"  # a comma between digits: every mark goes
    assert strip_punctuation("3.5 ft.") == "3.5 ft"  # a period before a digit stays
    assert normalise_words("Two  dogs") == "2 dogs"
    assert normalise_words("the cat on a mat") == "cat on mat"
    assert normalise_words("Dont know") == "don't know" and normalise_words("None") == "0"
    assert normalise_textvqa("McDonald's?") == "mcdonald 's"  # TextVQA splits off 's and drops ? and ,


def test_vqa_accuracy_is_human_agreement_over_leave_one_out_subsets():
    # 2 of 10 humans say "2": leaving one of them out, 1 match (1/3); leaving a "3" out, 2 matches (2/3)
    assert vqa_accuracy("Two.", ["two", "2"] + ["3"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("Dog", ["the dog", "a dog", "dog"] + ["cat"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("Dont know", ["dont know", "don't know"] + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("1000", ["1,000"] * 4 + ["many"] * 6) == 1.0
    # identical human answers: VQAv2 normalises nothing, so case matters; TextVQA always normalises
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert textvqa_accuracy("Yes", ["yes"] * 10) == 1.0


def vqa_files(tmp_path):
    questions = [(1, "how many", "number", "Two.", ["two", "2"] + ["3"] * 8),  # 0.6
                 (2, "how many", "number", "4", ["4"] * 10),  # 1.0
                 (3, "is the", "yes/no", "Yes", ["yes"] * 10)]  # 0.0
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": qid, "question_type": qtype, "answer_type": atype, "image_id": 9,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, qtype, atype, _, answers in questions]}))
    question_file = tmp_path / "questions.json"
    question_file.write_text(json.dumps({"questions": [{"question_id": q[0], "image_id": 9, "question": "?"}
                                                       for q in questions]}))
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"question_id": q[0], "answer": q[3]} for q in questions]))
    return annotations, question_file, predictions


def test_vqa_scores_overall_and_per_type_in_percent(tmp_path, capsys):
    annotations, questions, predictions = vqa_files(tmp_path)
    printed = run_json(capsys, "vqa", "--annotations", str(annotations), "--predictions", str(predictions),
                       "--questions", str(questions))
    assert printed["overall"] == round(100 * 1.6 / 3, 2) == 53.33
    assert printed["per_answer_type"] == {"number": 80.0, "yes/no": 0.0}
    assert printed["per_question_type"] == {"how many": 80.0, "is the": 0.0}
    assert printed["benchmark"] == "vqav2" and printed["questions"] == 3


def test_textvqa_annotations_are_told_apart_by_their_layout(tmp_path):
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 5, "question": "what brand?", "answers": ["STOP"] * 10},
        {"question_id": 6, "question": "what sign?", "answers": ["mcdonald's"] * 3 + ["other"] * 7}]}))
    predictions = write_lines(tmp_path / "predictions.jsonl", [{"question_id": 5, "answer": "stop"},
                                                             {"question_id": 6, "answer": "McDonald's"}])
    result = score_vqa(annotations, predictions)
    # "STOP" and "stop" agree (1.0); 3 humans agree with McDonald's: 2/3 leaving one of them out, else 1 (0.9)
    assert (result.benchmark, result.overall, result.per_answer_type) == ("textvqa", 95.0, {})
    with pytest.raises(BadScoreInput, match="holds its questions"):
        score_vqa(annotations, predictions, questions=annotations)


def test_vqa_bad_predictions_exit_2_naming_the_question(tmp_path, capsys):
    annotations, _, predictions = vqa_files(tmp_path)
    flags = ["--annotations", str(annotations), "--predictions", str(predictions)]
    predictions.write_text(json.dumps([{"question_id": q, "answer": "x"} for q in (1, 2, 3, 77)]))
    assert f"{predictions}, record 4: question_id 77 is not in the annotations" in run_bad(capsys, "vqa", *flags)
    predictions.write_text(json.dumps([{"question_id": 1, "answer": "x"}]))
    assert "no prediction for 2 annotated questions (question_id 2, 3)" in run_bad(capsys, "vqa", *flags)
    predictions.write_text(json.dumps([{"question_id": 1, "answer": 4}]))
    assert "record 1: field 'answer' must be a string" in run_bad(capsys, "vqa", *flags)
    assert "no such file" in run_bad(capsys, "vqa", "--annotations", str(tmp_path / "none.json"),
                                     "--predictions", str(predictions))


# ------------------------------------------------------------------ GenEval


def geneval_line(tag: str, prompt: int, correct: bool) -> dict:
    metadata = json.dumps({"tag": tag, "include": [{"class": "dog", "count": prompt}], "prompt": f"p{prompt}"})
    return {"filename": f"{prompt:05d}/samples/0000.png", "tag": tag, "prompt": f"p{prompt}", "correct": correct,
            "reason": "", "metadata": metadata, "details": "{}"}


def test_geneval_overall_is_the_mean_of_tag_accuracies(tmp_path, capsys):
    results = write_lines(tmp_path / "results.jsonl", [
        geneval_line("single_object", 1, True), geneval_line("single_object", 1, False),
        geneval_line("two_object", 2, True), geneval_line("two_object", 2, True),
        geneval_line("single_object", 3, False), geneval_line("single_object", 3, False)])
    result = score_geneval(results)
    assert {tag: s.accuracy for tag, s in result.tags.items()} == {"single_object": 0.25, "two_object": 1.0}
    assert result.overall == 0.625  # not 3 / 6, the share of all images
    assert (result.images, result.prompts, result.correct_images, result.correct_prompts) == (6, 3, 0.5, 2 / 3)
    printed = run_json(capsys, "geneval", str(results))
    assert printed["overall"] == 0.625 and list(printed["tags"]) == ["single_object", "two_object"]
    assert "single_object    = 25.00% (1 / 4)" in result.report()


def test_geneval_bad_line_exit_2(tmp_path, capsys):
    line = geneval_line("colors", 1, True)
    del line["correct"]
    results = write_lines(tmp_path / "results.jsonl", [geneval_line("colors", 2, True), line])
    assert f"{results}:2: missing field 'correct'" in run_bad(capsys, "geneval", str(results))
    results.write_text("{not json\n")
    assert f"{results}:1: not valid JSON" in run_bad(capsys, "geneval", str(results))


# ------------------------------------------------------------------ DPG-Bench


def dpg_prompt(item_id, *questions):
    return {"item_id": item_id, "questions": [
        {"proposition_id": pid, "dependency": parents, "tuple": f"{category} (thing)", "answers": answers}
        for pid, parents, category, answers in questions]}


DPG_PROMPTS = [
    dpg_prompt("partiprompts1",
               (1, [0], "entity - whole", ["no", "yes", "yes", "yes"]),
               (2, [1], "attribute - color", ["yes", "yes", "no", "yes"]),
               (3, [2], "relation - spatial", ["yes", "yes", "yes", "Yes"])),  # "Yes" is not "yes"
    dpg_prompt("countbench7", (1, [0], "global", ["yes", "yes", "yes", "yes"])),
]


def test_dpg_counts_a_question_only_where_its_parents_hold(tmp_path, capsys):
    answers = write_lines(tmp_path / "answers.jsonl", DPG_PROMPTS)
    result = score_dpg(answers)
    # tiles of the first prompt: q1 no zeroes q2 and, through it, q3 (0); all yes (1); q2 no zeroes q3 (1/3);
    # q3's "Yes" counts 0 (2/3)
    assert result.prompts == {"partiprompts1": pytest.approx((0 + 1 + 1 / 3 + 2 / 3) / 4), "countbench7": 1.0}
    assert result.overall == pytest.approx((0.5 + 1.0) / 2 * 100)
    printed = run_json(capsys, "dpg", str(answers))
    # categories: the last tile's answers, without the parent rule
    assert printed["categories"] == {"attribute": 100.0, "entity": 100.0, "global": 100.0, "relation": 0.0}
    assert printed["subcategories"]["entity - whole"] == 100.0 and printed["prompts"] == 2


def test_dpg_bad_input_exit_2(tmp_path, capsys):
    orphan = dpg_prompt("p", (1, [0], "entity - whole", ["yes"]), (2, [5], "attribute - color", ["yes"]))
    answers = write_lines(tmp_path / "answers.jsonl", [DPG_PROMPTS[1], orphan])
    assert f"{answers}:2, questions[2]: dependency names proposition 5" in run_bad(capsys, "dpg", str(answers))
    ragged = dpg_prompt("p", (1, [0], "entity - whole", ["yes", "no"]), (2, [1], "global", ["yes"]))
    write_lines(answers, [ragged])
    assert "questions[2]: 1 answers, but questions[1] has 2" in run_bad(capsys, "dpg", str(answers))
    write_lines(answers, [DPG_PROMPTS[1], DPG_PROMPTS[1]])
    assert ":2: item_id 'countbench7' appears twice" in run_bad(capsys, "dpg", str(answers))


# ------------------------------------------------------------------ WISE


def wise_lines(score_of) -> list[dict]:
    return [{"prompt_id": prompt_id, **score_of(prompt_id)} for prompt_id in range(1, 1001)]


def test_wise_weighs_categories_as_the_official_script(tmp_path, capsys):
    def figures(prompt_id):
        c, r, a = ((2, 2, 2) if prompt_id <= 400 else (0, 0, 0) if prompt_id <= 567 else (2, 0, 0) if prompt_id <= 700
                   else (1, 1, 1) if prompt_id <= 800 else (0, 0, 0) if prompt_id <= 900 else (0, 2, 0))
        return {"consistency": c, "realism": r, "aesthetic_quality": a}

    scores = write_lines(tmp_path / "scores.jsonl", wise_lines(figures))
    printed = run_json(capsys, "wise", str(scores))
    assert printed["categories"] == pytest.approx({"cultural": 1.0, "time": 0.0, "space": 0.7, "biology": 0.5,
                                                   "physics": 0.0, "chemistry": 0.2})
    assert printed["overall"] == pytest.approx(0.4 * 1.0 + 0.133 * 0.7 + 0.1 * 0.5 + 0.1 * 0.2)
    assert printed["counts"]["time"] == 167 and printed["missing_prompt_ids"] == []


def test_wise_verified_has_its_own_ranges_and_weights(tmp_path):
    scores = write_lines(tmp_path / "verified.jsonl",
                         wise_lines(lambda prompt_id: {"score": 0 if 401 <= prompt_id <= 520 else 1}))
    result = score_wise([scores], verified=True)
    assert result.categories == {"cultural": 1.0, "time": 0.0, "space": 1.0, "biology": 1.0, "physics": 1.0,
                                 "chemistry": 1.0}
    assert result.overall == pytest.approx(0.4 + 4 * 0.12)
    with pytest.raises(BadScoreInput, match="missing field 'consistency'.*pass --verified"):
        score_wise([scores])


def test_wise_overall_needs_every_prompt_and_bad_lines_exit_2(tmp_path, capsys):
    first = write_lines(tmp_path / "culture.jsonl", [{"prompt_id": 1, "score": 1}, {"prompt_id": 2, "score": 0}])
    result = score_wise([first], verified=True)
    assert result.overall is None and result.categories == {"cultural": 0.5} and len(result.missing) == 998
    assert "overall: needs a score for every prompt id 1..1000; 998 have none (3, 4" in result.report()
    second = write_lines(tmp_path / "more.jsonl", [{"prompt_id": 2, "score": 1}])
    assert f"{second}:1: prompt_id 2 is scored twice (first at {first}:2)" in run_bad(
        capsys, "wise", str(first), str(second), "--verified")
    write_lines(second, [{"prompt_id": 1001, "score": 1}])
    assert "prompt_id must be in 1..1000" in run_bad(capsys, "wise", str(second), "--verified")
    write_lines(second, [{"prompt_id": 3, "consistency": 3, "realism": 1, "aesthetic_quality": 1}])
    assert f"{second}:1: field 'consistency' must be in 0..2, got 3" in run_bad(capsys, "wise", str(second))


# ------------------------------------------------------------------ MMMU


OPTIONS = ["cat", "dog", "12", "the blue one"]


def test_mmmu_multiple_choice_parsing():
    rng = fallback_rng()
    assert parse_multi_choice("(B)", OPTIONS, rng) == "B"
    assert parse_multi_choice("Not (A) but (C).", OPTIONS, rng) == "C"  # the last one found wins
    assert parse_multi_choice("B.", OPTIONS, rng) == "B"  # trailing marks stripped, then " B "
    assert parse_multi_choice("A or maybe D", OPTIONS, rng) == "D"
    assert parse_multi_choice("Answer: A (dog-like)", OPTIONS, rng) == "A"
    # an option's text, in a response of more than five words; the last found wins
    assert parse_multi_choice("I would say that it is the blue one", OPTIONS, rng) == "D"
    assert parse_multi_choice("it is a dog and not a cat", OPTIONS, rng) == "A"
    # nothing found (an option's text counts only past five words): a draw, as the reference's random.seed(42)
    # and then random.choice for each unparsed response
    draws = [parse_multi_choice(response, OPTIONS, rng) for response in ("a dog", "no idea", "?", "", "(E)", "hmm")]
    reference = random.Random(42)
    assert draws == [reference.choice("ABCD") for _ in range(6)] == ["A", "A", "C", "B", "B", "B"]


def test_mmmu_open_parsing():
    assert check_open("3.5", parse_open("The answer is 3.50."))  # numbers compare rounded to 2 decimals
    assert check_open("1200", parse_open("So the total is 1,200 dollars"))
    assert check_open("Paris", parse_open("I think so the capital is Paris"))  # the shortest tail: "paris"
    assert check_open(["MgS", "$MgS$"], parse_open("The product is MgS"))
    assert not check_open("A", parse_open("A cat is small"))  # a single character must stand at a word's edge
    assert not check_open("7", parse_open("x = 8"))
    assert parse_open("x = 8") == [8.0]  # "=" closes the last line: its tail "8", and the number 8 in it
    assert sorted(map(str, parse_open("It is red\nso the answer is 2 cm"))) == ["2 cm", "2.0", "red"]


def test_mmmu_scores_per_subject_discipline_and_overall(tmp_path, capsys):
    key = write_lines(tmp_path / "key.jsonl", [
        {"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B", "options": str(OPTIONS)},
        {"id": "validation_Art_2", "question_type": "multiple-choice", "answer": "A", "options": OPTIONS},
        {"id": "validation_Math_1", "question_type": "open", "answer": "42", "options": "[]"},
        {"id": "validation_Math_2", "question_type": "open", "answer": "5", "options": "[]"}])
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps({"validation_Art_1": "(B)", "validation_Art_2": "(C)",
                                     "validation_Math_1": "Therefore the result is 42."}))
    result = score_mmmu(responses, key)
    assert result.subjects == {"Art": (1, 2), "Math": (1, 1)}
    printed = run_json(capsys, "mmmu", str(responses), "--answer-key", str(key))
    assert printed["overall"] == 2 / 3 and printed["subjects"] == {"Art": 0.5, "Math": 1.0}
    assert printed["disciplines"] == {"Art and Design": 0.5, "Science": 1.0} and printed["questions"] == 3
    assert "(responses for 3 of the answer key's 4 questions)" in result.report()


def test_mmmu_bad_input_exit_2(tmp_path, capsys):
    key = write_lines(tmp_path / "key.jsonl", [
        {"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B", "options": OPTIONS}])
    responses = write_lines(tmp_path / "responses.jsonl", [{"id": "validation_Art_9", "response": "B"}])
    flags = ["--answer-key", str(key)]
    assert f"{responses}:1: id 'validation_Art_9' is not in the answer key" in run_bad(
        capsys, "mmmu", str(responses), *flags)
    write_lines(key, [{"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B"}])
    assert f"{key}:1: missing field 'options'" in run_bad(capsys, "mmmu", str(responses), *flags)
