"""The toy world, family and evaluator behind the CPU miniature (README, "The miniature")."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from dopsd_ray.families.toy import TOY_BASE_DIR
from dopsd_ray.families.toy import INFERENCE_STEPS, LORA_TARGETS, ToyFamily, ToyPipeline, build_tiny_toy
from dopsd_ray.toy import world
from dopsd_ray.toy.build import distill, record_trajectories, render_items, sample, train_flow
from dopsd_ray.toy.concept import Concept, class_items, prior_items, write_concept_dataset
from dopsd_ray.toy.evaluator import Evaluator, evaluate, palette_share, rendered_batch
from dopsd_ray.weights import LoraWeights, state_dict


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_toy(tmp_path_factory.mktemp("toy"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ToyFamily.from_pretrained(tiny_dir)


def renders(n: int, seed: int = 0) -> tuple[torch.Tensor, list[world.Item]]:
    return rendered_batch(n, torch.Generator().manual_seed(seed))


def test_renders_are_pure_palette_and_blur_leaves_it():
    images, items = renders(16)
    assert images.shape == (16, 3, world.SIZE, world.SIZE)
    assert palette_share(images).min().item() == 1.0
    blurred = F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    assert palette_share(blurred).mean().item() < 0.9
    assert items[0].caption == f"a {items[0].colour} {items[0].shape} on a {items[0].background} background"
    masks = {s: world.mask(s, 16, 16, 10) for s in world.SHAPES}
    assert all((masks[a] != masks[b]).sum() > 20 for a in masks for b in masks if a != b)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        world.render("red", "hexagon", "black")


def test_speckle_is_half_shaded_and_the_schedule_is_the_recipes(tiny):
    """Each region is its colour or its shade, cell by cell, about half each; the 4-step
    grid is the released recipe's 1, .9, .75, .5, 0 (shift 3), and SFT's sampled sigmas
    go through the same shift."""
    image = (world.render("red", "square", "white", torch.Generator().manual_seed(0)) + 1) / 2
    strip = image[:, :2, :]  # background only: a square's top edge is below row 3
    shaded = (strip - torch.tensor(world.SHADES["white"]).view(3, 1, 1)).abs().amax(0) < 1e-6
    plain = (strip - torch.tensor(world.BACKGROUNDS["white"]).view(3, 1, 1)).abs().amax(0) < 1e-6
    assert (shaded | plain).all() and 0.2 < shaded.float().mean() < 0.8
    cells = shaded.unflatten(0, (1, 2)).unflatten(2, (16, 2))  # every 2x2 cell is one or the other
    assert (cells.amin((1, 3)) == cells.amax((1, 3))).all()
    torch.testing.assert_close(tiny.inference_sigmas(4, 32, 32), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(tiny.shift_sigmas(torch.tensor([0.25, 0.5]), 32, 32, 4), torch.tensor([0.5, 0.75]))


def test_latents_round_trip_and_sizes(tiny):
    images, _ = renders(3)
    latents = tiny.encode_images(images)
    assert latents.shape == tiny.latent_shape(3, world.SIZE, world.SIZE) == (3, 12, 16, 16)
    assert torch.equal(tiny.decode_latents(latents), images)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        tiny.check_images(torch.zeros(1, 3, 32, 36))


def test_teacher_context_reads_the_image_and_masked_image_tokens_equal_text_only(tiny):
    images, items = renders(2, seed=1)
    captions = ["a sks on a black background"] * 2
    x = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    student = tiny.student_context(captions)
    teacher = tiny.teacher_context(captions, images)
    assert teacher.features.shape[1] == student.features.shape[1] + 17  # 16 patches + class token
    assert torch.equal(teacher.features[:, : tiny.max_sequence_length], student.features)
    v_teacher = tiny.velocity(tiny.transformer, x, torch.tensor(0.75), teacher)
    other = tiny.teacher_context(captions, images.flip(0))
    assert (tiny.velocity(tiny.transformer, x, torch.tensor(0.75), other) - v_teacher).abs().max() > 1e-4
    teacher.mask[:, tiny.max_sequence_length:] = False  # what base.mixed_context does for text-only items
    v_masked = tiny.velocity(tiny.transformer, x, torch.tensor(0.75), teacher)
    v_text = tiny.velocity(tiny.transformer, x, torch.tensor(0.75), student)
    torch.testing.assert_close(v_masked, v_text, rtol=1e-5, atol=1e-5)
    assert pickle.loads(pickle.dumps(student)).features.shape == student.features.shape  # Ray ships contexts
    unknown = tiny.tokenizer(["a qqqq on a black background"]).input_ids[0]
    assert tiny.tokenizer.unk_token_id in unknown and tiny.tokenizer.unk_token_id not in \
        tiny.tokenizer(["a sks on a black background"]).input_ids[0]


def test_lora_export_loads_into_a_fresh_unet(tiny_dir, tmp_path):
    tiny = ToyFamily.from_pretrained(tiny_dir)  # its own copy: LoRA adapters stay on it
    weights = LoraWeights(tiny.transformer, LORA_TARGETS, rank=4, alpha=4)
    with torch.no_grad():
        for p in weights.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    images, items = renders(2)
    ctx = tiny.student_context([i.caption for i in items])
    x = tiny.encode_images(images)
    expected = tiny.velocity(weights.model, x, torch.tensor(0.5), ctx)
    file = weights.export(tmp_path / "lora", ToyPipeline, state=state_dict(weights))
    reloaded = ToyFamily.from_pretrained(tiny_dir).transformer
    reloaded.load_lora_adapter(str(file), prefix="unet")
    torch.testing.assert_close(tiny.velocity(reloaded, x, torch.tensor(0.5), ctx), expected, rtol=1e-4, atol=1e-5)


def test_concept_dataset_and_prompts(tmp_path):
    concept = Concept("sks", "cyan", "cross")
    folder = write_concept_dataset(tmp_path / "c", concept)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 4 and {p.with_suffix(".txt").read_text().strip() for p in pngs} == {
        "a sks on a black background", "a sks on a white background"}
    assert concept.heldout_backgrounds == ("gray", "brown")
    assert all(i.colour != "cyan" and i.shape != "cross" for i in prior_items(concept))
    with pytest.raises(ValueError, match="already means something"):
        Concept("red")
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        Concept("sks", "teal", "cross")


def test_class_images_preserve_the_prior_without_touching_its_test(tmp_path):
    """Prior-preservation renders: captioned world items over every other colour, never the
    concept nor a prior-retention prompt; a re-run with fewer leaves no stale files."""
    concept = Concept("sks", "cyan", "cross")
    folder = write_concept_dataset(tmp_path / "c", concept, class_images=10)
    extra = sorted(folder.glob("class_*.png"))
    items = class_items(concept, 10)
    assert len(extra) == 10 and len(set(items)) == 10
    assert {p.with_suffix(".txt").read_text().strip() for p in extra} == {i.caption for i in items}
    assert not set(items) & set(prior_items(concept)) and not any(concept.shows(i.colour, i.shape) for i in items)
    assert {i.colour for i in items} == set(world.COLOURS) - {"cyan"}
    write_concept_dataset(folder, concept)
    assert len(list(folder.glob("*.png"))) == 4
    with pytest.raises(ValueError, match="class_images=1000"):
        class_items(concept, 1000)


def test_committed_base_samples_well_at_4_steps():
    """The committed weights still sample as their recorded figures say (guards the latent
    layout, contexts and schedule against code drift)."""
    recorded = json.loads((TOY_BASE_DIR / "base_figures.json").read_text())["distilled"]
    family = ToyFamily.from_pretrained(TOY_BASE_DIR)
    evaluator = Evaluator.load(TOY_BASE_DIR / "evaluator.safetensors")
    images, items = renders(64, seed=5)
    assert evaluate(evaluator, images, items)["accuracy"] > 0.95  # the evaluator knows the world
    samples = sample(family, family.transformer, family.student_context([i.caption for i in items]), INFERENCE_STEPS, 0)
    scores = evaluate(evaluator, samples, items)
    assert scores["accuracy"] > recorded["4_steps"]["accuracy"] - 0.12, scores
    assert scores["palette_share"] > recorded["4_steps"]["palette_share"] - 0.05, scores
    # the teacher context: a placeholder word + the image renders the image's colour
    ctx = family.teacher_context([world.concept_caption("sks", i.background) for i in items],
                                 render_items(items, torch.Generator().manual_seed(9)))
    teacher = evaluate(evaluator, sample(family, family.transformer, ctx, INFERENCE_STEPS, 0), items)
    assert teacher["colour_accuracy"] > 0.9, teacher


def test_base_builder_loops_train_within_their_budget_and_report_progress(tiny_dir):
    """The committed base's recipe in miniature: flow matching, trajectories, distillation -
    each loop stops at its wall-clock budget, returns an EMA model that moved, and logs."""
    family = ToyFamily.from_pretrained(tiny_dir)
    before = [p.detach().clone() for p in family.transformer.parameters()]
    lines = []
    flow, flow_steps = train_flow(family, minutes=0.03, batch_size=4, seed=0, log=lines.append)
    assert flow_steps > 0 and lines[-1].startswith(f"flow: {flow_steps} steps in ")
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters()))
    pool = record_trajectories(family, flow, n=8, batch_size=4, seed=2, steps=8, log=lines.append)
    assert pool[0].shape[:2] == (8, INFERENCE_STEPS + 1)
    student, distill_steps = distill(family, flow, minutes=0.03, batch_size=4, seed=0, pool=pool, log=lines.append)
    assert distill_steps > 0 and lines[-1].startswith(f"distill: {distill_steps} steps in ")
    assert any(not torch.equal(a, b) for a, b in zip(flow.parameters(), student.parameters()))
