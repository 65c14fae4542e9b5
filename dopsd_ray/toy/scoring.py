"""The miniature's scores as one evaluation metric (evaluation.Metric), and its prompts.

    prompts = toy_prompts(concept)                      # held-out x 24, prior x 4 (the miniature's)
    metric = ToyMetric(Evaluator.load(base / "evaluator.safetensors"), concept)
    evaluation.evaluate(family, exports, prompts, settings, [metric])   # adds the toy/... numbers

- toy/concept: share of held-out samples ("a sks on a <background not seen in training>") that
  show the concept (its colour, and its shape when it has one); toy/concept_background: share
  with the prompt's background;
- toy/quality: mean palette share of every sample (falls when samples blur); toy/confidence:
  the evaluator's mean confidence in its own answers;
- toy/prior: accuracy (colour, shape and background right) on the prior prompts, held-in
  prompts of the world that do not show the concept.
"""

import statistics

import torch

from ..evaluation import Prompt
from . import world
from .concept import Concept, prior_items
from .evaluator import Evaluator, evaluate, palette_share, predict

SAMPLES_PER_PROMPT = {"heldout": 24, "prior": 4}


def toy_prompts(concept: Concept) -> list[Prompt]:
    """The held-out concept prompts (24 samples each) and the prior prompts (4 each)."""
    return ([Prompt("heldout", concept.prompt(i.background), SAMPLES_PER_PROMPT["heldout"])
             for i in concept.heldout_items]
            + [Prompt("prior", i.caption, SAMPLES_PER_PROMPT["prior"]) for i in prior_items(concept)])


def concept_scores(evaluator: Evaluator, samples: torch.Tensor, concept: Concept, items: list[world.Item]) -> dict:
    """Share of samples that show the concept (colour, and shape if it has one), and the
    share with the prompt's (held-out) background."""
    names, _ = predict(evaluator, samples)
    shows = [concept.shows(c, s) for c, s in zip(names["colour"], names["shape"])]
    background = [b == i.background for b, i in zip(names["background"], items)]
    return {"concept": statistics.mean(shows), "concept_background": statistics.mean(background)}


def quality_scores(evaluator: Evaluator, samples: torch.Tensor) -> dict:
    """4-step quality: mean palette share (falls when samples blur) and classifier confidence."""
    _, confidence = predict(evaluator, samples)
    return {"quality": palette_share(samples).mean().item(), "confidence": confidence.mean().item()}


class ToyMetric:
    """The toy evaluator's scores of evaluation samples (module docstring), named toy/<score>."""

    def __init__(self, evaluator: Evaluator, concept: Concept):
        self.evaluator, self.concept = evaluator, concept
        # what each prompt should show: held-out prompts by background, prior prompts by caption
        self.heldout = {concept.prompt(i.background): i for i in concept.heldout_items}
        self.prior = {i.caption: i for i in world.all_items()}

    def check_prompts(self, prompts: list[Prompt]) -> None:
        """ValueError for a held-out or prior prompt the evaluator has no answer for."""
        for p in prompts:
            known = {"heldout": self.heldout, "prior": self.prior}.get(p.kind)
            if known is not None and p.text not in known:
                raise ValueError(f"toy evaluation: {p.kind} prompt {p.text!r} is none of the concept's "
                                 f"{p.kind} prompts, e.g. {next(iter(known))!r}")

    def __call__(self, samples: dict) -> dict[str, float]:
        scores = quality_scores(self.evaluator, torch.cat([s.images for s in samples.values()]))
        if "heldout" in samples:
            s = samples["heldout"]
            scores |= concept_scores(self.evaluator, s.images, self.concept, [self.heldout[p] for p in s.prompts])
        if "prior" in samples:
            s = samples["prior"]
            scores["prior"] = evaluate(self.evaluator, s.images, [self.prior[p] for p in s.prompts])["accuracy"]
        return {f"toy/{k}": v for k, v in scores.items()}
