"""Benchmark scorers: each reads a benchmark's own output or judge files and applies its official formula.

| module        | benchmark                      | reads                                                    |
|---------------|--------------------------------|----------------------------------------------------------|
| `geneval.py`  | GenEval                        | the object detector's per-image results (JSON lines)     |
| `dpg.py`      | DPG-Bench                      | the judge's yes/no answers per question and image tile   |
| `wise.py`     | WISE (and WISE-Verified)       | the judge's scores per prompt (JSON lines)               |
| `mme.py`      | MME                            | the eval tool's `<task>.txt` files with predictions      |
| `vqa.py`      | VQAv2, TextVQA                 | the official annotations and a predictions list          |
| `mmmu.py`     | MMMU                           | responses and the answer key                             |
| `inputs.py`   | reading those files; `BadScoreInput` names the file, line and field of what is wrong      |
| `commands.py` | `blip3o eval score BENCH`                                                                 |

Each `score_*` function returns a result with `to_json()` (the figures) and `report()` (the text the
official script prints, laid out as a table).
"""
