"""Benchmark runners: each reads a benchmark's own files from a local folder and writes what its scorer reads.

| module             | what it owns                                                                        |
|--------------------|-------------------------------------------------------------------------------------|
| `work.py`          | sharding over torchrun's ranks, atomic item outputs, resuming, settings.json         |
| `generation.py`    | prompts -> images with the model's settings, a step at a time                       |
| `understanding.py` | questions -> greedy answers under an understanding protocol, saved in parts          |
| `geneval.py`       | GenEval: evaluation_metadata.jsonl -> OUT/00000/{metadata.jsonl, samples/, grid.png} |
| `dpg.py`           | DPG-Bench: prompts/*.txt -> OUT/<name>.png, 2x2 grids                               |
| `wise.py`          | WISE: prompt JSON files -> OUT/<prompt_id>.png                                      |
| `judge.py`         | WISE's judge: an OpenAI-compatible vision endpoint -> WISE's scores files           |
| `mme.py`           | MME: the release folder -> OUT/<task>.txt (eval_tool's format)                      |
| `vqa.py`           | VQAv2, TextVQA: question JSON + images -> OUT/predictions.json (EvalAI's format)    |
| `mmmu.py`          | MMMU: parquet or JSON rows -> OUT/responses.json ({id: response})                   |
| `commands.py`      | `blip3o eval geneval|dpg|wise|wise-judge|mme|vqav2|textvqa|mmmu`                    |
"""
