"""The D-OPSD and SFT steps on a tiny real Z-Image family, pinned against docs/method.md; the
learning-rate schedule."""

import math

import pytest
import torch

from dopsd_ray.algorithms.dopsd import choose_states, dopsd_step
from dopsd_ray.algorithms.ema import ema_update
from dopsd_ray.algorithms.lr_schedule import lr_at
from dopsd_ray.algorithms.schedules import RECIPE_4STEP, training_sigmas
from dopsd_ray.algorithms.steps import Batch, colocated_loss, experience_loss, make_experience, velocity_fn
from dopsd_ray.config import AlgorithmConfig, LoraSettings, ModelConfig, OptimConfig
from dopsd_ray.families import complete_model, load_family
from dopsd_ray.families.zimage import LORA_TARGETS
from dopsd_ray.weights import TEACHER, EmaTeacher, FullWeights, LoraWeights, make_weights, state_dict

H = W = 32
SIGMAS = torch.tensor(RECIPE_4STEP)
CAPTIONS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_zimage_dir):
    return tiny_zimage_dir


def model_cfg(tiny_dir):
    return complete_model(ModelConfig(path=str(tiny_dir), max_sequence_length=64, teacher_max_sequence_length=128,
                                      vlm_min_pixels=32 * 32, vlm_max_pixels=64 * 64))


@pytest.fixture
def family(tiny_dir):
    torch.manual_seed(0)
    return load_family(model_cfg(tiny_dir))


def images(seed=0, n=2):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def lora(family, perturb=True):
    w = LoraWeights(family.transformer, LORA_TARGETS, rank=4, alpha=8)
    if perturb:  # gaussian init has B = 0: make student and teacher differ from the base and each other
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in w.trainable_parameters() + w.teacher_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return w


def naive_dopsd_loss(family, weights, captions, imgs, noise, sigmas):
    """docs/method.md's loop ("One training step"), line by line, deliberately naive."""
    model = weights.model
    with torch.no_grad():
        c_s = family.student_context(captions)
        c_t = family.teacher_context(captions, imgs)
    x = noise.clone()
    loss = 0
    K = len(sigmas) - 1
    for k in range(K):
        x = x.detach()
        with torch.no_grad():
            model.set_adapter("teacher")
            v_T = family.velocity(model, x, sigmas[k], c_t)
            model.set_adapter("student")
        v_S = family.velocity(model, x, sigmas[k], c_s)
        x0_S = x - sigmas[k] * v_S
        x0_T = x - sigmas[k] * v_T
        loss = loss + ((x0_S - x0_T) ** 2).mean()
        x = x + (sigmas[k + 1] - sigmas[k]) * v_S
    return loss / K


def test_dopsd_step_equals_naive_loop(family):
    w = lora(family)
    algo = AlgorithmConfig()
    batch = Batch(images(), CAPTIONS, ["a", "b"], index=3, seed=7)
    loss, metrics = colocated_loss(family, w, batch, SIGMAS, algo)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in w.named_parameters()}
    for p in w.trainable_parameters():
        p.grad = None

    noise = torch.randn(family.latent_shape(2, H, W), generator=batch.generator)
    naive = naive_dopsd_loss(family, w, CAPTIONS, batch.images, noise, SIGMAS)
    naive.backward()
    assert loss.item() > 0
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-7)
    for k, p in w.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-8)
    assert metrics["trained_states"] == 2 * 4


@pytest.mark.parametrize("where", ["colocated", "experience_with_targets", "experience_teacher_here", "sft"])
def test_a_backward_per_trained_state_gives_the_gradients_of_the_mean_loss(family, where):
    """The learner's path: `backward` gets each trained state's share as soon as it is scored
    (one graph alive at a time); its gradients equal one backward of the mean, the returned
    loss is the mean, detached, and `last` is set on the final call only."""
    w = lora(family)

    def run(backward):
        for p in w.trainable_parameters():
            p.grad = None
        algo = AlgorithmConfig(name="sft" if where == "sft" else "dopsd", states_per_rollout=3)
        batch = Batch(images(), CAPTIONS, ["a", "b"], index=4, seed=1)
        if where in ("colocated", "sft"):
            loss, _ = colocated_loss(family, w, batch, SIGMAS, algo, backward)
        else:
            exp = make_experience(family, w, batch, SIGMAS, algo, version=0,
                                  with_targets=where == "experience_with_targets")
            loss, _ = experience_loss(family, w, exp, algo, backward)
        if backward is None:
            loss.backward()
        return loss, {k: p.grad.clone() for k, p in w.named_parameters() if p.grad is not None}

    calls = []

    def backward(share, last):
        assert share.requires_grad
        calls.append(last)
        share.backward()

    mean, want = run(None)
    loss, got = run(backward)
    assert not loss.requires_grad and loss.item() == pytest.approx(mean.item(), rel=1e-6)
    assert calls == ([True] if where == "sft" else [False, False, True])  # 3 of the K=4 states
    assert want and want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-8)


def test_velocity_loss_is_x0_loss_without_sigma_squared(family):
    w = lora(family)
    teacher = lambda x, s: family.velocity(w.model, x, s, family.student_context(["other"] * 2))
    student = velocity_fn(family, w.model, family.student_context(CAPTIONS))
    noise = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    x0 = dopsd_step(student, teacher, noise, SIGMAS, "x0")
    vel = dopsd_step(student, teacher, noise, SIGMAS, "velocity")
    expected = [l * float(s) ** 2 for l, s in zip(vel.state_losses, SIGMAS)]
    assert x0.state_losses == pytest.approx(expected, rel=1e-5)


def test_no_gradient_crosses_rollout_steps_and_teacher_gets_none(family):
    w = lora(family)
    c_s, c_t = family.student_context(CAPTIONS), family.teacher_context(CAPTIONS, images())
    student = velocity_fn(family, w.model, c_s)

    def teacher(x, s):
        with w.teacher() as m:
            return family.velocity(m, x, s, c_t)

    noise = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    # train only on the last state: its gradient must not flow back through earlier Euler steps
    out = dopsd_step(student, teacher, noise, SIGMAS, "x0", train_states=[3])
    out.loss.backward()
    chained = [p.grad.clone() for p in w.trainable_parameters()]
    assert not out.states.requires_grad
    assert all(p.grad is None for p in w.teacher_parameters())
    for p in w.trainable_parameters():
        p.grad = None
    # the same state, scored in isolation (no chain at all)
    x3 = out.states[3]
    with torch.no_grad():
        v_t = teacher(x3, SIGMAS[3])
    alone = SIGMAS[3] ** 2 * (student(x3, SIGMAS[3]) - v_t).pow(2).mean()
    alone.backward()
    for a, b in zip(chained, w.trainable_parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-9)


def test_lr_schedule_warms_up_from_the_first_step_then_holds_or_decays():
    """lr_at(step) for steps 0..T-1: W warm-up steps at lr (s+1)/(W+1), none of them at 0;
    then constant, or diffusers' linear and cosine decay, whose last step is still above 0."""
    T, W = 10, 3

    def lrs(scheduler, warmup=W):
        optim = OptimConfig(lr=1.0, scheduler=scheduler, warmup_steps=warmup)
        return [lr_at(s, optim, T) for s in range(T)]

    warm = [0.25, 0.5, 0.75]
    assert lrs("constant") == pytest.approx(warm + [1.0] * 7)
    assert lrs("linear") == pytest.approx(warm + [1 - k / 7 for k in range(7)])
    assert lrs("cosine") == pytest.approx(warm + [0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(7)])
    assert lrs("linear")[-1] == pytest.approx(1 / 7) and 0 < lrs("cosine")[-1] < 0.06
    assert lrs("constant", warmup=0) == [1.0] * T  # the released recipes
    assert lrs("cosine", warmup=0)[0] == 1.0
    assert lrs("linear", warmup=20) == pytest.approx([(s + 1) / 21 for s in range(T)])  # warm-up past the end
    assert lr_at(4, OptimConfig(lr=3e-4, scheduler="cosine", warmup_steps=W), T) == 3e-4 * lrs("cosine")[4]


def test_ema_formula_and_decay_zero_copies():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, generator=g), torch.randn(5, generator=g)
    t0 = t.clone()
    ema_update([t], [s], 0.9)
    torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    ema_update([t], [s], 0.0)
    assert torch.equal(t, s)


def test_lora_teacher_starts_equal_and_tracks_student_by_ema(family):
    w = lora(family, perturb=False)
    assert all(torch.equal(a, b) for a, b in zip(w.teacher_parameters(), w.trainable_parameters()))
    with torch.no_grad():
        for p in w.trainable_parameters():
            p.add_(1.0)
    before = [t.clone() for t in w.teacher_parameters()]
    EmaTeacher(w).step(0.75)
    for t0, t, s in zip(before, w.teacher_parameters(), w.trainable_parameters()):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * s)
    EmaTeacher(w).step(0.0)
    assert state_dict(w, TEACHER).keys() == state_dict(w).keys()
    assert all(torch.equal(state_dict(w, TEACHER)[k], v) for k, v in state_dict(w).items())


def test_state_subset_trains_on_chosen_states_only(family):
    w = lora(family)
    algo = AlgorithmConfig(states_per_rollout=2)
    batch = Batch(images(), CAPTIONS, ["a", "b"], seed=1)
    loss, metrics = colocated_loss(family, w, batch, SIGMAS, algo)
    chosen = [k for k in range(4) if any(key.startswith(f"loss/state_{k}_") for key in metrics)]
    assert len(chosen) == 2 and metrics["trained_states"] == 4
    gen = batch.generator  # the same draws in the same order: the noise first, then the subset
    torch.randn(family.latent_shape(2, H, W), generator=gen)
    assert chosen == choose_states(4, 2, gen)
    assert loss.item() == pytest.approx(sum(metrics[k] for k in metrics if k.startswith("loss/state_")) / 2, rel=1e-6)


def test_the_teacher_runs_only_on_the_states_trained_on():
    seen = []

    def teacher(x, sigma):
        seen.append(float(sigma))
        return torch.zeros_like(x)

    student = torch.nn.Linear(1, 1, bias=False)
    out = dopsd_step(lambda x, sigma: student.weight * x, teacher, torch.randn(2, 1), SIGMAS, train_states=[1, 3])
    assert seen == [float(SIGMAS[1]), float(SIGMAS[3])] and len(out.state_losses) == 2


@pytest.mark.parametrize("targets_on_worker", [False, True])
def test_disaggregated_experience_gives_the_colocated_loss(family, targets_on_worker):
    w = lora(family)
    algo = AlgorithmConfig()
    batch = Batch(images(), CAPTIONS, ["a", "b"], index=2, seed=3)
    colocated, _ = colocated_loss(family, w, batch, SIGMAS, algo)
    exp = make_experience(family, w, batch, SIGMAS, algo, version=5, with_targets=targets_on_worker)
    assert exp.version == 5 and (exp.targets is not None) == targets_on_worker
    learner, _ = experience_loss(family, w, exp, algo)
    torch.testing.assert_close(learner, colocated, rtol=1e-5, atol=1e-8)


def fit(family, w, batch, sigmas, algo, steps, lr):
    opt = torch.optim.AdamW(w.trainable_parameters(), lr=lr)
    ema = EmaTeacher(w)
    losses = []
    for _ in range(steps):
        loss, _ = colocated_loss(family, w, batch, sigmas, algo)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(w.trainable_parameters(), 1.0)
        opt.step()
        ema.step(algo.ema_decay)
        losses.append(loss.item())
    return losses


def test_repeated_dopsd_steps_reduce_the_student_teacher_loss(family):
    w = lora(family)
    batch = Batch(images(), CAPTIONS, ["a", "b"], seed=0)  # fixed batch and noise
    losses = fit(family, w, batch, SIGMAS, AlgorithmConfig(ema_decay=0.999), steps=15, lr=5e-3)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_repeated_sft_steps_reduce_the_sft_loss(family):
    w = lora(family)
    batch = Batch(images(), CAPTIONS, ["a", "b"], seed=0)
    losses = fit(family, w, batch, SIGMAS, AlgorithmConfig(name="sft"), steps=15, lr=5e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_full_finetuning_trains_every_weight_and_not_the_teacher(family):
    w = make_weights(family.transformer, LoraSettings(enabled=False), LORA_TARGETS)
    assert isinstance(w, FullWeights)
    loss, _ = colocated_loss(family, w, Batch(images(), CAPTIONS, ["a", "b"]), SIGMAS, AlgorithmConfig())
    loss.backward()
    named = dict(w.named_parameters())
    no_grad = [k for k, p in named.items() if p.grad is None]
    assert all("pad_token" in k for k in no_grad), no_grad  # pad tokens are used only when padding
    assert all(p.grad is None for p in w.teacher_parameters())


def test_training_sigma_presets(family):
    assert training_sigmas("recipe_4step", family, H, W, 8).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    inference = training_sigmas("inference", family, H, W, 8)
    assert len(inference) == 9 and inference[0] == 1.0 and inference[-1] == 0.0
    assert training_sigmas([1.0, 0.5, 0.0], family, H, W, 8).tolist() == [1.0, 0.5, 0.0]


def test_exported_lora_in_the_stock_pipeline_reproduces_the_student(family, tiny_dir, tmp_path):
    from diffusers import ZImagePipeline

    from dopsd_ray.algorithms.sampling import euler_sample

    w = lora(family)
    path = w.export(tmp_path / "lora", ZImagePipeline)
    assert path.suffix == ".safetensors"
    prompt = CAPTIONS[0]
    noise = torch.randn(family.latent_shape(1, H, W), generator=torch.Generator().manual_seed(0))
    ours = euler_sample(velocity_fn(family, w.model, family.student_context([prompt])), noise,
                        family.inference_sigmas(8, H, W))
    ours = (family.decode_latents(ours) / 2 + 0.5).clamp(0, 1)

    pipe = ZImagePipeline.from_pretrained(str(tiny_dir))
    pipe.load_lora_weights(str(path.parent))
    stock = pipe(prompt, height=H, width=W, num_inference_steps=8, guidance_scale=0.0, latents=noise,
                 output_type="pt", max_sequence_length=64).images
    assert (ours - stock).abs().max().item() <= 1e-5


def test_bad_inputs_fail_clearly(family, tiny_dir):
    with pytest.raises(ValueError, match="3 captions"):
        Batch(images(n=2), CAPTIONS + ["x"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        Batch(images(n=2), [CAPTIONS[0], "  "], ["a", "b"])
    with pytest.raises(ValueError, match="multiple"):
        family.check_images(torch.zeros(1, 3, H + 8, W))
    cfg = model_cfg(tiny_dir)
    with pytest.raises(ValueError, match=r"model.family: unknown model family; known: .* \(got 'sdxl'\)"):
        complete_model(ModelConfig.model_validate({**cfg.model_dump(), "family": "sdxl"}))


def test_full_finetuning_exports_a_transformer_folder_from_pretrained_loads(family, tmp_path):
    from diffusers import ZImageTransformer2DModel

    w = make_weights(family.transformer, LoraSettings(enabled=False), LORA_TARGETS)
    with torch.no_grad():
        next(iter(w.trainable_parameters())).add_(0.5)
    folder = w.export(tmp_path / "transformer")
    loaded = ZImageTransformer2DModel.from_pretrained(str(folder))
    theirs = dict(loaded.named_parameters())
    for k, p in w.named_parameters():
        assert torch.equal(theirs[k], p.detach()), k
