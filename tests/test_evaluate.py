"""evaluate_generation's bookkeeping, with a stand-in model (no network, no weights)."""

from PIL import Image

from blip3o.images import image_grid
from blip3o.shapes import TAGS, evaluation_prompts
from blip3o.shapes.evaluate import GRID_PER_TAG, evaluate_generation


class BlankModel:
    """Draws nothing: every check fails, every image is the same."""

    def generate(self, prompts, *, num_images, seed):
        return [Image.new("RGB", (64, 64), (250, 250, 250)) for _ in range(len(prompts) * num_images)]


def test_the_sample_grid_has_a_row_per_tag_in_prompt_order():
    per_tag = GRID_PER_TAG + 2
    result = evaluate_generation(BlankModel(), per_tag=per_tag, num_images=2, seed=5)
    prompts = evaluation_prompts(per_tag, 5)
    expected = [p.text for tag in TAGS for p in [q for q in prompts if q.tag == tag][:GRID_PER_TAG]]
    assert [text for text, _ in result["samples"]] == expected
    assert result["num_images"] == 2 * per_tag * len(TAGS)
    assert result["scores"]["overall"] == 0.0 and result["diverse_prompts"] == 0.0
    grid = image_grid([image for _, image in result["samples"]], columns=GRID_PER_TAG)
    assert grid.size == (GRID_PER_TAG * 64, len(TAGS) * 64)
