"""Every fine-tuning method (``TrialSettings.method``) trains exactly its tensors, keeps working with everything
else (WiSE-FT's alpha 0 is the base model bit for bit, ‖ΔW‖ is the true norm, the export is an open_clip checkpoint
that computes what the trial computed, the frozen-prefix cache gives the same losses, a checkpoint holds only the
trained tensors and resumes exactly), and the methods space samples every method equally often."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from open_clip.loss import ClipLoss

from study.library.alignment import apply_alignment_module, trainable_state, unwrap, weight_change_norm
from study.library.models import load_base_model
from study.library.wiseft import interpolate
from study.settings import TrialSettings

METHODS = ["lora", "full", "bitfit", "attention", "projections"]


def slow_but(*fast):
    """Every method, those not in ``fast`` in the CI's slow stage (the default suite stays within its time)."""
    return [m if m in fast else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
         "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
         "mlp.c_proj.bias"]  # an open_clip residual block's parameters
# What each method trains in each of the last K blocks (BitFit: every bias term, LayerNorms' included), and LoRA's
# adapted modules (peft wraps nn.MultiheadAttention whole; its out_proj gets an adapter of its own).
IN_BLOCK = {"full": BLOCK, "bitfit": [n for n in BLOCK if n.endswith("bias")], "attention": BLOCK[2:6],
            "projections": []}
LORA_MODULES = ["attn", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj"]
ALIGNMENT = {"visual.proj", "text_projection", "logit_scale"}
LAST_TWO = [f"{tower}.{b}" for tower in ("visual.transformer.resblocks", "transformer.resblocks") for b in (1, 2)]


@pytest.fixture(autouse=True)
def keep_threads():
    """The worker's setup sets torch's thread count for its process (one per CPU it holds); give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _model(method: str, seed: int = 0, **knobs):
    torch.manual_seed(seed)
    lm = load_base_model("clip-study-tiny", None)  # random weights: 3 blocks per tower
    s = TrialSettings(method=method, lora_blocks=2, lora_rank=2, **knobs)
    return lm, s, copy.deepcopy(lm.model).eval(), apply_alignment_module(lm.model, s)


def _train(model, tokenizer, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    t = tokenizer([f"a red circle {i}" for i in range(8)])
    losses = []
    for _ in range(steps):
        img, txt, scale = model(x, t)
        loss = ClipLoss()(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exactly_its_tensors_and_nothing_else_moves(method):
    lm, s, pristine, model = _model(method)
    trainable = {re.sub(r"^base_model\.model\.", "", n) for n, p in model.named_parameters() if p.requires_grad}
    if method == "lora":
        expected = ALIGNMENT | {f"{b}.{m}.lora_{ab}.default.weight" for b in LAST_TWO for m in LORA_MODULES
                                for ab in "AB"}
    else:
        expected = ALIGNMENT | {f"{b}.{n}" for b in LAST_TWO for n in IN_BLOCK[method]}
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in pristine.named_parameters()}
    _train(model, lm.tokenizer)
    after = {n.replace(".base_layer", ""): p for n, p in unwrap(model).named_parameters()}  # peft's wrappers
    for n, p in before.items():
        if n in trainable:
            assert not torch.equal(after[n], p), f"{n} should train"
        elif method != "lora" or ".attn." not in n:  # peft merges a LoRA attention's delta in and out: round-off
            assert torch.equal(after[n], p), f"{n} should stay frozen"


@pytest.mark.parametrize("method", METHODS)
def test_wiseft_alpha_zero_is_the_base_model_bit_for_bit_and_norm_is_the_true_change(method):
    """As a trial's WiSE-FT does: a freshly loaded base model with the trained tensors, the change scaled by α.
    And ‖ΔW‖ of the trained model is the Frobenius norm of what changed in the merged open_clip model."""
    from study.library.alignment import load_trainable_state
    from study.library.export import merged_clip

    lm, s, pristine, model = _model(method)
    initial = trainable_state(model)
    _train(model, lm.tokenizer)
    trained = trainable_state(model)
    x, t = torch.randn(4, 3, 32, 32), lm.tokenizer(["a red circle", "two squares", "a cell", "stain"])
    fresh = apply_alignment_module(copy.deepcopy(pristine), s).eval()
    load_trainable_state(fresh, trained)
    with torch.no_grad():
        interpolate(fresh, initial, trained, 0.0)
        assert torch.equal(fresh.encode_image(x), pristine.encode_image(x))
        assert torch.equal(fresh.encode_text(t), pristine.encode_text(t))
        interpolate(fresh, initial, trained, 1.0)
        torch.testing.assert_close(fresh.encode_image(x), model.eval().encode_image(x), atol=1e-5, rtol=1e-5)
        half = fresh.encode_text(t).clone()
        interpolate(fresh, initial, trained, 0.5)
        assert not torch.allclose(fresh.encode_text(t), half)  # alpha really moves the model

    logged = weight_change_norm(model, initial)
    merged, base = merged_clip(copy.deepcopy(model)).state_dict(), pristine.state_dict()
    real = sum(float((merged[k].float() - base[k].float()).pow(2).sum()) for k in base) ** 0.5
    assert real > 0.01
    assert logged == pytest.approx(real, rel=1e-4)


@pytest.mark.parametrize("method", slow_but("full"))  # LoRA's: tests/test_export.py
def test_export_is_an_open_clip_checkpoint_that_reproduces_the_trials_metrics(method, smoke_world, smoke_cache,
                                                                               tmp_path):
    """A trial's saved adapter folder, exported at alpha 1 and loaded by open_clip's own loader, scores every
    benchmark part as the live trained model does, within 1e-5 (the CLI version: tests/test_export.py); the
    folder holds only the trained tensors."""
    import open_clip
    from safetensors.torch import load_file

    from study.library.alignment import save_adapter
    from study.library.benchmarks import eval_sets
    from study.library.export import merged_clip, trained_model, write_checkpoint
    from study.library.zeroshot import evaluate_sets

    cfg, prepared = smoke_world
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    s = TrialSettings(method=method, lora_blocks=2, lora_rank=2)
    model = apply_alignment_module(lm.model, s)
    _train(model, lm.tokenizer, steps=3, lr=3e-3)
    folder = save_adapter(model, tmp_path / "adapter")
    saved = {n for f in folder.glob("*.safetensors") for n in load_file(str(f))}
    assert len(saved) == len(trainable_state(model))  # the trained tensors, nothing frozen
    sets = eval_sets(cfg.data, smoke_cache, lm.preprocess, validation_share=cfg.evaluation.validation_share)
    live, _, _ = evaluate_sets(unwrap(model).eval(), lm.tokenizer, sets, "cpu")

    exported = trained_model(cfg.model.name, prepared.model_pretrained, s, folder, alpha=1.0)
    path = write_checkpoint(merged_clip(exported.model), tmp_path / "model.pt")
    loaded, _, _ = open_clip.create_model_and_transforms(cfg.model.name, pretrained=str(path), weights_only=True)
    again, _, _ = evaluate_sets(loaded.eval(), lm.tokenizer, sets, "cpu")
    assert live.keys() == again.keys() and len(live) >= 20
    for k in live:
        assert again[k] == pytest.approx(live[k], abs=1e-5), k


@pytest.mark.parametrize("method", slow_but("full"))  # LoRA's: tests/test_prefix_cache.py
def test_frozen_prefix_cache_gives_the_same_losses(method, smoke_world, smoke_cache):
    """Training on the cached prefix tokens (the suffix only) and on images gives the same losses, step by step."""
    from study.library.alignment import trained_blocks
    from study.library.cache import model_id
    from study.library.finetune import decoded_finetune
    from study.library.objective import alignment_loss, tether_targets
    from study.library.prefix import SuffixCLIP, finetune_features

    cfg, prepared = smoke_world
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    depths = prepared.prefix_depths
    d = decoded_finetune(cfg.data.finetune, cfg.data, smoke_cache, lm.preprocess)
    tokens = lm.tokenizer(d["captions"])
    feats = finetune_features(lm, model_id(cfg.model.name, prepared.model_pretrained), depths, d["store"], tokens,
                              smoke_cache)
    lr = 5e-4 if method in ("full", "attention") else 5e-3  # a step that lowers the loss, for each method
    s = TrialSettings(method=method, lora_blocks=1, tether_weight=1.0, learning_rate=lr)
    assert all(int(b.rpartition(".")[2]) >= depths["image"] for b in trained_blocks(lm.model, s))  # in the suffix
    idx = torch.arange(32)
    batch = feats.read(idx, ["image", "text", "teacher_image", "teacher_text"])
    teacher = tether_targets(lm.model, d["store"].subset(idx.numpy()), tokens[idx], "cpu")
    losses = {}
    for name in ("images", "cache"):
        torch.manual_seed(0)
        model = apply_alignment_module(copy.deepcopy(lm.model), s)
        net, inputs, target = ((model, (d["store"][idx], tokens[idx]), teacher) if name == "images" else
                               (SuffixCLIP(model, depths), (batch["image"], batch["text"], tokens[idx]),
                                (batch["teacher_image"], batch["teacher_text"])))
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=s.learning_rate)
        losses[name] = []
        for _ in range(3):
            img, txt, scale = net(*inputs)
            loss = alignment_loss(ClipLoss(), img, txt, scale, s.tether_weight, *target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["images"][-1] < losses["images"][0]  # it trains
    torch.testing.assert_close(losses["cache"], losses["images"], atol=1e-5, rtol=1e-5)


class RecordingSession:
    """The worker loop's session, as Ray Train's or Tune's would be, keeping each reported checkpoint folder."""

    def __init__(self, keep):
        self.keep, self.reports = keep, []

    def place(self):
        return 0, 1, torch.device("cpu")

    def report(self, metrics, directory):
        import shutil

        if directory:
            shutil.copytree(directory, self.keep / f"epoch{len(self.reports) + 1}")
        self.reports.append(metrics)


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_holds_only_the_trained_tensors_and_resumes_exactly(method, smoke_world, smoke_cache, tmp_path):
    """Two epochs straight, against one epoch, its checkpoint, and a fresh worker restored from it for the second:
    the same weights. The checkpoint holds the trained tensors and their optimizer state, no frozen weight."""
    import ray.train

    from study.orchestration.worker import WorkerJob, checkpoint_and_report, distribute, restore, setup, train_epoch

    cfg, prepared = smoke_world
    job = WorkerJob(settings=TrialSettings(method=method, lora_blocks=1, lora_rank=2, data_fraction=0.3, epochs=2,
                                           batch_size=32, warmup_steps=0, learning_rate=3e-3),
                    data=cfg.data, model_name=cfg.model.name, model_pretrained=prepared.model_pretrained,
                    cache_dir=str(smoke_cache), prefix_depths=prepared.prefix_depths, baseline=prepared.baseline)
    session = RecordingSession(tmp_path)
    straight = setup(job, session)
    distribute(straight)
    for epoch in range(2):
        train_epoch(straight, epoch)
        checkpoint_and_report(straight, epoch, {"epoch": epoch + 1})
    state = torch.load(tmp_path / "epoch1" / "state.pt", weights_only=True)
    assert set(state) == {"trainable", "optimizer", "scheduler", "epoch"}
    assert state["trainable"].keys() == trainable_state(straight.model).keys()

    resumed = setup(job, RecordingSession(tmp_path / "other"))
    restore(resumed, ray.train.Checkpoint.from_directory(str(tmp_path / "epoch1")))
    assert resumed.start_epoch == 1
    distribute(resumed)
    train_epoch(resumed, 1)
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-6)


def test_the_methods_space_samples_every_method_equally_often():
    """search_spaces/methods.yaml's stratified sampler, through Tune's Optuna searcher as a sweep builds it: 20
    trials give each method 4 (each method x K pair twice), with learning rates drawn at random."""
    from collections import Counter

    from study.config import SPACES_DIR, load_study_config
    from study.orchestration.tuner import searcher, tune_space

    cfg = load_study_config(SPACES_DIR / "methods.yaml")
    search = searcher(cfg, "sweep-test")
    search.set_search_properties(None, None, tune_space(cfg.space.searched))
    drawn = [search.suggest(f"t{i}") for i in range(cfg.search.trials)]
    assert Counter(d["method"] for d in drawn) == {m: 4 for m in METHODS}
    assert Counter((d["method"], d["lora_blocks"]) for d in drawn) == {(m, k): 2 for m in METHODS for k in (1, 2)}
    assert len({d["learning_rate"] for d in drawn}) == 20
