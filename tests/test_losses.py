"""Our losses against open_clip's (the oracle the field uses), on random features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import DistillClipLoss

from dmclip.losses.clip import (
    ClipLoss,
    DistillMix,
    FeatureDistillLoss,
    clip_loss,
    feature_loss,
    interactive_contrastive_loss,
    kd_loss,
)
from dmclip.registry import losses


def _features(seed: int, batch: int = 8, dim: int = 16, scale: float = 14.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_features": F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
        "text_features": F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
        "logit_scale": torch.tensor(scale),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_loss_equals_open_clip(seed):
    f = _features(seed)
    expected = OpenClipLoss()(f["image_features"], f["text_features"], f["logit_scale"])
    torch.testing.assert_close(clip_loss(f), expected, rtol=1e-6, atol=1e-6)


def test_a_clip_temperature_learned_past_100_is_clamped_as_open_clip_does():
    """A CLIP whose learned logit scale drifted above log 100 trains on exactly the loss of one at 100
    (open_clip's clamp), and gets no gradient pushing the scale further up."""
    from dmclip.models.base import build_model
    from dmclip.models.clip import clip_arch

    torch.manual_seed(0)
    model = build_model(clip_arch(image_size=8, patch_size=4, vision_width=16, vision_depth=1, vision_heads=2,
                                  text_width=16, text_depth=1, text_heads=2, embed_dim=8))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    out = model(torch.randn(4, 3, 8, 8), model.tokenize(["a red circle", "a blue square", "two stars", "a cat"]))
    loss = clip_loss(out)
    expected = OpenClipLoss()(out["image_features"].detach(), out["text_features"].detach(), torch.tensor(100.0))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.logit_scale.grad.item() == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_kd_loss_equals_open_clip_distill_term(seed):
    student, teacher = _features(seed), _features(seed + 100, scale=50.0)
    _, distill = DistillClipLoss()(student["image_features"], student["text_features"], student["logit_scale"],
                                   teacher["image_features"], teacher["text_features"], teacher["logit_scale"])
    torch.testing.assert_close(kd_loss(student, teacher), distill, rtol=1e-6, atol=1e-6)


def test_kd_is_minimal_when_student_equals_teacher():
    """KD against oneself is the teacher's entropy: any other student scores higher."""
    teacher = _features(3)
    same = kd_loss(teacher, teacher)
    other = kd_loss(_features(4), teacher)
    assert other > same


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.75, 1.0])
def test_distill_mix_is_the_weighted_sum(alpha):
    student, teacher = _features(5), _features(6)
    out = DistillMix(alpha)(student, teacher)
    expected = alpha * kd_loss(student, teacher) + (1 - alpha) * clip_loss(student)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    assert set(out) == {"loss", "contrastive", "kd"}  # a term at weight 0 is neither computed nor logged


def test_the_parts_logged_are_the_terms_trained_on():
    """alpha 1 logs no contrastive term; alpha 0 logs no KD and reads no teacher image features (distill
    does not compute them then)."""
    student, teacher = _features(11), _features(12)
    pure_kd = DistillMix(1.0)(student, teacher)
    torch.testing.assert_close(pure_kd["kd"], kd_loss(student, teacher))
    assert pure_kd["contrastive"].item() == 0.0
    text_only_teacher = {k: v for k, v in teacher.items() if k != "image_features"}
    pure_contrastive = DistillMix(0.0)(student, text_only_teacher)
    torch.testing.assert_close(pure_contrastive["contrastive"], clip_loss(student))
    assert pure_contrastive["kd"].item() == 0.0


def test_distill_mix_built_without_settings_is_distills_default_objective():
    """DistillMix() from Python trains what `dmclip distill` trains with no loss.* settings."""
    from dmclip.distill import LossConfig

    mix, config = DistillMix(), LossConfig()
    for name in ("alpha", "feature_weight", "feature_kind", "fd_weight", "icl_weight", "teacher_logit_scale"):
        assert getattr(mix, name) == getattr(config, name), name


def test_clip_loss_module_is_pretrains_objective():
    f = _features(13)
    out = ClipLoss()(f)
    torch.testing.assert_close(out["loss"], clip_loss(f))
    torch.testing.assert_close(out["contrastive"], clip_loss(f))
    assert set(out) == {"loss", "contrastive"}


def test_contrastive_labels_live_on_the_features_device():
    """On an accelerator the labels must be created there too; the meta device stands in for one."""
    f = {k: v.to("meta") for k, v in _features(14).items()}
    assert clip_loss(f).device.type == "meta"


def test_feature_loss_cosine_and_mse():
    student, teacher = _features(7), _features(8)
    cos = feature_loss(student, teacher, "cosine")
    expected = (1 - F.cosine_similarity(student["image_features"], teacher["image_features"])).mean()
    torch.testing.assert_close(cos, expected)
    assert feature_loss(student, student, "cosine").abs() < 1e-6
    torch.testing.assert_close(feature_loss(student, teacher, "mse"),
                               F.mse_loss(student["image_features"], teacher["image_features"]))


def test_distill_mix_uses_the_feature_kind_it_is_given():
    student, teacher = _features(15), _features(16)
    mse_mix = DistillMix(0.0, feature_weight=1.0, feature_kind="mse")(student, teacher)
    torch.testing.assert_close(mse_mix["feature"], F.mse_loss(student["image_features"], teacher["image_features"]))


def test_gradients_flow_only_to_student():
    student, teacher = _features(9), _features(10)
    student["image_features"].requires_grad_(True)
    teacher["image_features"].requires_grad_(True)
    DistillMix(0.5, feature_weight=1.0)(student, teacher)["loss"].backward()
    assert student["image_features"].grad is not None and student["image_features"].grad.abs().sum() > 0
    assert teacher["image_features"].grad is None


@pytest.fixture(scope="module")
def distill_inputs():
    """(teacher, vit-nano student, 8 samples): what distill's task needs to build a loss and call it."""
    from dmclip.data import build_dataset
    from dmclip.distill import DistillConfig, StudentConfig, build_student, load_teacher

    teacher = load_teacher("builtin:world-vit")
    torch.manual_seed(0)
    student = build_student(DistillConfig(teacher="builtin:world-vit", student=StudentConfig("vit-nano")), teacher)
    data = build_dataset("world-train:size=8", image_size=teacher.image_size)
    return teacher, student, [data[i] for i in range(8)]


@pytest.mark.parametrize("name", losses.names())
def test_every_registered_loss_is_selectable_by_distills_loss_name(name, distill_inputs):
    """What `dmclip list losses` lists, `--set loss.name=<name>` trains with: built from distill's loss.*
    settings (every CLIP-KD weight on, so each reaches the factory), one step's loss is finite, has named
    parts, and reaches the student's image tower."""
    from dmclip.distill import DistillConfig, DistillTask, LossConfig, StudentConfig

    teacher, student, samples = distill_inputs
    cfg = DistillConfig(teacher="builtin:world-vit", student=StudentConfig("vit-nano"),
                        loss=LossConfig(alpha=0.5, feature_weight=0.5, fd_weight=1.0, icl_weight=0.5, name=name))
    task = DistillTask(student, teacher, cfg)
    student.zero_grad()
    out = task.loss(student, task.collate(samples), step=0)
    assert torch.isfinite(out["loss"]) and len(out) >= 2, out
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.visual.parameters())


def test_ensemble_kd_targets_are_teacher_probabilities_averaged_after_softmax():
    """MobileCLIP's ensemble: mean of the members' softmax distributions, not of their logits."""
    student, t1, t2 = _features(20), _features(21, scale=30.0), _features(22, scale=80.0)
    ensemble = {**t1, "members": [t1, t2]}
    got = kd_loss(student, ensemble)
    s_img = student["logit_scale"] * student["image_features"] @ student["text_features"].T
    probs = [(t["logit_scale"] * t["image_features"] @ t["text_features"].T) for t in (t1, t2)]
    p_img = (probs[0].softmax(1) + probs[1].softmax(1)) / 2
    p_txt = (probs[0].T.softmax(1) + probs[1].T.softmax(1)) / 2
    expected = (-(p_img * s_img.log_softmax(1)).sum(1).mean() - (p_txt * s_img.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # an ensemble of one teacher twice is that teacher
    torch.testing.assert_close(kd_loss(student, {**t1, "members": [t1, t1]}), kd_loss(student, t1))


# ------------------------------------------------------------------ CLIP-KD's terms, written out by hand


def _cross_entropy_diag(logits: torch.Tensor) -> torch.Tensor:
    """-1/B sum_i log(exp(l_ii) / sum_j exp(l_ij)), element by element."""
    B = logits.shape[0]
    total = 0.0
    for i in range(B):
        total += -(logits[i, i] - torch.log(torch.exp(logits[i]).sum()))
    return total / B


def test_fd_is_clip_kd_mse_of_image_and_text_embeddings():
    """CLIP-KD eq. 4: ||v_s - v_t||^2 + ||u_s - u_t||^2, each averaged over batch and dimensions."""
    student, teacher = _features(30), _features(31)
    B, D = student["image_features"].shape
    image = sum(((student["image_features"][i, d] - teacher["image_features"][i, d]) ** 2)
                for i in range(B) for d in range(D)) / (B * D)
    text = sum(((student["text_features"][i, d] - teacher["text_features"][i, d]) ** 2)
               for i in range(B) for d in range(D)) / (B * D)
    torch.testing.assert_close(FeatureDistillLoss()(student, teacher), image + text, rtol=1e-6, atol=1e-7)
    frozen_text = {**student, "text_features": teacher["text_features"]}  # a shared, frozen text tower
    torch.testing.assert_close(FeatureDistillLoss()(frozen_text, teacher), image, rtol=1e-6, atol=1e-7)
    image_only_teacher = {k: v for k, v in teacher.items() if k != "text_features"}
    torch.testing.assert_close(FeatureDistillLoss()(student, image_only_teacher), image, rtol=1e-6, atol=1e-7)


def test_fd_learns_a_projection_when_widths_differ():
    student, teacher = _features(32, dim=8), _features(33, dim=16)
    loss = FeatureDistillLoss(student_dim=8, teacher_dim=16)
    assert isinstance(loss.projection, torch.nn.Linear) and loss.projection.weight.shape == (16, 8)
    assert sum(p.numel() for p in loss.parameters()) == 16 * 8  # CLIP-KD's projection is linear: no bias
    projected = {k: (loss.projection(v) if k.endswith("features") else v) for k, v in student.items()}
    expected = (F.mse_loss(projected["image_features"], teacher["image_features"])
                + F.mse_loss(projected["text_features"], teacher["text_features"]))
    out = loss(student, teacher)
    torch.testing.assert_close(out, expected)
    out.backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0
    assert isinstance(FeatureDistillLoss(16, 16).projection, torch.nn.Identity)


def test_distill_mix_projects_a_narrower_student_for_fd():
    student, teacher = _features(40, dim=8), _features(41, dim=16)
    mix = DistillMix(0.5, fd_weight=2.0, student_dim=8, teacher_dim=16)
    student_projected = {**student, "image_features": mix.fd.projection(student["image_features"]),
                         "text_features": mix.fd.projection(student["text_features"])}
    expected = (F.mse_loss(student_projected["image_features"], teacher["image_features"])
                + F.mse_loss(student_projected["text_features"], teacher["text_features"]))
    out = mix(student, teacher)
    torch.testing.assert_close(out["fd"], expected)
    assert mix.fd.projection.weight.shape == (16, 8)


def test_icl_is_student_image_vs_teacher_text_and_student_text_vs_teacher_image():
    """CLIP-KD eq. 6-8 with the student's temperature."""
    student, teacher = _features(34, scale=20.0), _features(35, scale=70.0)
    s = student["logit_scale"]
    i2t = _cross_entropy_diag(s * student["image_features"] @ teacher["text_features"].T)
    t2i = _cross_entropy_diag(s * student["text_features"] @ teacher["image_features"].T)
    torch.testing.assert_close(interactive_contrastive_loss(student, teacher), (i2t + t2i) / 2,
                               rtol=1e-5, atol=1e-6)


def test_distill_mix_with_every_term_is_its_formula():
    student, teacher = _features(36), _features(37, scale=40.0)
    mix = DistillMix(0.6, feature_weight=0.5, fd_weight=3.0, icl_weight=0.25)
    out = mix(student, teacher)
    cosine = (1 - F.cosine_similarity(student["image_features"], teacher["image_features"])).mean()
    fd = (F.mse_loss(student["image_features"], teacher["image_features"])
          + F.mse_loss(student["text_features"], teacher["text_features"]))
    expected = (0.6 * kd_loss(student, teacher) + 0.4 * clip_loss(student) + 0.5 * cosine + 3.0 * fd
                + 0.25 * interactive_contrastive_loss(student, teacher))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    assert set(out) == {"loss", "contrastive", "kd", "feature", "fd", "icl"}
    torch.testing.assert_close(out["feature"], cosine)
    torch.testing.assert_close(out["fd"], fd)
    torch.testing.assert_close(out["icl"], interactive_contrastive_loss(student, teacher))


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_a_fixed_teacher_logit_scale_replaces_the_teachers_in_the_kd_targets(scale):
    """teacher_logit_scale=100 (MobileCLIP) = the teacher's own scale replaced by 100 in KD's targets; any
    scale above 0 does so (1 gives soft targets)."""
    student, teacher = _features(38), _features(39, scale=10.0)
    fixed = DistillMix(1.0, teacher_logit_scale=scale)(student, teacher)["loss"]
    torch.testing.assert_close(fixed, kd_loss(student, {**teacher, "logit_scale": torch.tensor(scale)}))
    assert not torch.allclose(fixed, DistillMix(1.0)(student, teacher)["loss"])


def test_a_fixed_teacher_logit_scale_applies_to_every_ensemble_member():
    student, t1, t2 = _features(42), _features(43, scale=30.0), _features(44, scale=80.0)
    fixed = DistillMix(1.0, teacher_logit_scale=100.0)(student, {**t1, "members": [t1, t2]})["loss"]
    hundred = torch.tensor(100.0)
    rescaled = [{**t, "logit_scale": hundred} for t in (t1, t2)]
    torch.testing.assert_close(fixed, kd_loss(student, {**rescaled[0], "members": rescaled}))


def test_distill_builds_the_loss_its_config_names():
    """loss.name picks a registered loss (a plugin's too), built with the other loss.* settings."""
    from dmclip.data import build_dataset
    from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
    from dmclip.errors import DmclipError

    class DoubledMix(DistillMix):  # what a plugin might register: the objective, scaled
        def forward(self, student, teacher):
            out = super().forward(student, teacher)
            return {**out, "loss": 2 * out["loss"]}

    cfg = DistillConfig(teacher="builtin:world-vit")
    cfg.student.name, cfg.loss.alpha = "vit-nano", 0.5
    teacher = load_teacher(cfg.teacher)
    torch.manual_seed(0)
    student = build_student(cfg, teacher)
    default = DistillTask(student, teacher, cfg)
    assert type(default.criterion) is DistillMix and default.criterion.alpha == 0.5
    losses.add("test-doubled", DoubledMix, description="the distill objective times 2")
    try:
        cfg.loss.name = "test-doubled"
        doubled = DistillTask(student, teacher, cfg)
    finally:
        losses._remove("test-doubled")
    assert isinstance(doubled.criterion, DoubledMix) and doubled.criterion.alpha == 0.5
    data = build_dataset("world-train:size=8", image_size=teacher.image_size)
    batch = default.collate([data[i] for i in range(8)])
    with torch.no_grad():
        expected, got = default.loss(student, batch, step=3), doubled.loss(student, batch, step=3)
    torch.testing.assert_close(got["loss"], 2 * expected["loss"])
    torch.testing.assert_close(got["kd"], expected["kd"])
    cfg.loss.name = "dstill"
    with pytest.raises(DmclipError, match="no loss named 'dstill'") as info:
        DistillTask(student, teacher, cfg)
    assert "'distill'" in info.value.hint
    losses.add("test-term", lambda: clip_loss, description="a loss term, not an objective that takes loss.*")
    try:
        cfg.loss.name = "test-term"
        with pytest.raises(DmclipError, match="loss 'test-term' does not take distill's loss settings"):
            DistillTask(student, teacher, cfg)
    finally:
        losses._remove("test-term")


@pytest.mark.parametrize("settings, uses", [
    ({"alpha": 0.0}, False), ({"alpha": 0.75}, True), ({"alpha": 0.0, "feature_weight": 1.0}, True),
    ({"alpha": 0.0, "fd_weight": 1.0, "student_dim": 8, "teacher_dim": 16}, True),
    ({"alpha": 0.0, "icl_weight": 1.0}, True),
])
def test_the_teachers_image_tower_runs_only_for_a_term_that_reads_it(settings, uses):
    """distill skips the teacher's image forward when no term reads its image features; each term that does
    must say so, or it would read features that were never computed."""
    assert DistillMix(**settings).uses_teacher_images is uses


# ------------------------------------------------------------------ two ranks (gloo), in this process and a fork


def _two_rank_check(rank: int, store_path: str) -> dict:
    """On each of 2 ranks, rows [4 rank, 4 rank + 4) of one batch of 8: the CLIP loss averaged over ranks and
    this rank's input gradients, and open_clip's gather_features against ours for every option pair."""
    import datetime

    import open_clip.loss as reference
    import torch.distributed as dist

    from dmclip.losses.gather import gather_features

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        full = _features(50)
        rows = slice(4 * rank, 4 * rank + 4)
        local = {k: (v[rows].clone().requires_grad_() if k.endswith("features") else v) for k, v in full.items()}
        loss = clip_loss(local)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result = {"rows": rows, "loss": mean_loss / 2,
                  "grads": [local[k].grad / 2 for k in ("image_features", "text_features")], "gather": []}
        for local_loss in (False, True):
            for with_grad in (False, True):
                outputs = []
                for gather in (gather_features, reference.gather_features):
                    # float64: the gradient comes back in the features' own precision
                    image = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
                    text = torch.randn(3, 5, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
                    image.requires_grad_(), text.requires_grad_()
                    # local_loss left at its default (False, as open_clip's) when it is off
                    options = {"local_loss": True} if local_loss else {}
                    if gather is reference.gather_features:
                        options.update(rank=rank, world_size=2)
                    all_image, all_text = gather(image, text, gather_with_grad=with_grad, **options)
                    products = (image @ all_text.T, text @ all_image.T, all_image @ all_text.T)
                    sum(p.pow(2).mean() for p in products).backward()
                    outputs.append([all_image.detach(), all_text.detach(), image.grad, text.grad])
                result["gather"].append((local_loss, with_grad, outputs))
        return result
    finally:
        dist.destroy_process_group()


def _second_rank(store_path: str) -> None:
    _two_rank_check(1, store_path)


@pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional.all_gather:FutureWarning")
def test_two_ranks_train_on_the_one_process_clip_loss(tmp_path):
    """Under DDP each rank holds a slice of the batch: the loss averaged over ranks, and each rank's gradient
    averaged as DDP does, are open_clip's full-batch ones on one process; gather_features is open_clip's."""
    import multiprocessing

    store = str(tmp_path / "store")
    second = multiprocessing.get_context("fork").Process(target=_second_rank, args=(store,))
    second.start()
    try:
        result = _two_rank_check(0, store)
    except BaseException:
        second.kill()  # it would wait out the group's timeout for this rank
        raise
    finally:
        second.join(timeout=60)
    assert second.exitcode == 0
    full = _features(50)
    for key in ("image_features", "text_features"):
        full[key] = full[key].clone().requires_grad_()
    expected = OpenClipLoss()(full["image_features"], full["text_features"], full["logit_scale"])
    expected.backward()
    torch.testing.assert_close(result["loss"], expected.detach(), rtol=1e-6, atol=1e-6)
    for grad, key in zip(result["grads"], ("image_features", "text_features")):
        torch.testing.assert_close(grad, full[key].grad[result["rows"]], rtol=1e-5, atol=1e-7)
    for local_loss, with_grad, (ours, theirs) in result["gather"]:
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{local_loss=} {with_grad=}")
