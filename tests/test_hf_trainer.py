"""
DLLM-JEPA inside transformers.Trainer (dlm/hf_trainer.py), on a small tiny model (CPU, offline):
the loss is DLLMJEPA.forward's, the predictor trains, the EMA target moves once per optimizer
step, a resumed run ends exactly where the uninterrupted one does, exports load with AutoModel,
it stacks on another Trainer subclass (dllm's MDLMTrainer's shape), and the README's example runs.

    python -m pytest tests/test_hf_trainer.py -q
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, Trainer, TrainerCallback, TrainingArguments

from dlm import data
from dllm_jepa import DLLMJEPA, JEPAConfig, ema_momentum
from dlm.hf_trainer import JEPA_STATE, DLLMJEPATrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tokenizer):
    return data.tokenize_examples(data.builtin_task(32), tokenizer, seq_len=32)


def dataset(rows):
    return [dict(input_ids=i, prompt_lengths=p, answer_lengths=a)
            for i, p, a in zip(rows.input_ids, rows.prompt_lengths, rows.answer_lengths)]


def arguments(out, **overrides):
    return TrainingArguments(str(out), **{**dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3,
                                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                                 disable_tqdm=True, seed=0), **overrides})


def test_the_loss_is_dllm_jepa_forward_also_from_labels(tmp_path, make_model, rows, tokenizer):
    """On a fixed batch, compute_loss returns what DLLMJEPA.forward returns for the same masks,
    whether the batch gives its lengths or -100 labels over the prompt (dllm's and TRL's form)."""
    model = make_model()
    middle = (model.config.num_hidden_layers + 1) // 2  # the default, as train.py's
    twin = DLLMJEPA(copy.deepcopy(model), JEPAConfig(embed_layer=middle))  # what a user of dllm_jepa.py writes
    trainer = DLLMJEPATrainer(model, args=arguments(tmp_path), processing_class=tokenizer)
    assert trainer.model.jepa.config == JEPAConfig(embed_layer=middle)
    ids, prompt, answer = rows.input_ids[:4], rows.prompt_lengths[:4], rows.answer_lengths[:4]
    pos = torch.arange(ids.shape[1])
    labels = torch.where((pos >= prompt[:, None]) & (pos < (prompt + answer)[:, None]), ids, -100)
    torch.manual_seed(1)
    want = twin(ids, prompt, answer).loss
    for batch in (dict(input_ids=ids, prompt_lengths=prompt, answer_lengths=answer),
                  dict(input_ids=ids, labels=labels)):
        torch.manual_seed(1)
        assert torch.equal(trainer.compute_loss(trainer.model, batch), want)
    with pytest.raises(ValueError, match="needs prompt_lengths .* or labels"):
        trainer.compute_loss(trainer.model, dict(input_ids=ids))


class Record(TrainerCallback):
    """The online backbone's parameters after each optimizer step."""

    def __init__(self):
        self.online = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.online.append([p.detach().clone() for p in model.jepa.backbone.parameters()])


def test_ema_target_moves_once_per_optimizer_step_with_accumulation(tmp_path, make_model, rows):
    """3 optimizer steps of 2 accumulation micro-batches: the EMA target is the hand-computed
    lerp sequence of 3 updates (not 6), at train.py's momentum schedule; the predictor is in the
    optimizer and trains, the target is not in it; every logged row has its parts."""
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    record = Record()
    trainer = DLLMJEPATrainer(model, jepa_config=JEPAConfig(ema_momentum=(0.5, 0.9)), callbacks=[record],
                              args=arguments(tmp_path, gradient_accumulation_steps=2), train_dataset=dataset(rows))
    predictor = [p.detach().clone() for p in trainer.model.jepa.predictor.parameters()]
    trainer.train()

    assert len(record.online) == 3
    target = start
    for step, online in enumerate(record.online, 1):
        m = ema_momentum(step, 3, 0.5, 0.9)
        target = [torch.lerp(t, o, 1 - m) for t, o in zip(target, online)]
    for got, want in zip(trainer.model.jepa.target_encoder.parameters(), target, strict=True):
        assert torch.equal(got, want)

    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in trainer.model.jepa.predictor.parameters())
    assert not any(id(p) in in_optimizer for p in trainer.model.jepa.target_encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(predictor, trainer.model.jepa.predictor.parameters()))
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 3
    for row in logged:  # the Trainer's loss and the parts are means over the same micro-batches
        assert row["loss"] == pytest.approx(row["diffusion"] + row["jepa"], rel=1e-5)
        assert 0 < row["jepa"] < 2 and 0 <= row["answer_accuracy"] <= 1


def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path, make_model, rows, tokenizer):
    """4 steps straight, against 2 steps, a checkpoint, and a fresh trainer resumed from it: the
    backbone, the predictor and the EMA target are equal, bit for bit. A checkpoint without the
    JEPA state is refused in one line."""
    runs = {}
    for name, resume in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoint-2")):
        trainer = DLLMJEPATrainer(make_model(), processing_class=tokenizer, train_dataset=dataset(rows),
                                  args=arguments(tmp_path / name, max_steps=4, save_strategy="steps", save_steps=2))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs[name] = trainer.model.state_dict()
    assert (tmp_path / "straight" / "checkpoint-2" / JEPA_STATE).is_file()
    assert any(k.startswith("jepa.predictor.") for k in runs["straight"])
    assert any(k.startswith("jepa.target_encoder.") for k in runs["straight"])
    for key, value in runs["straight"].items():
        assert torch.equal(runs["resumed"][key], value), key

    (tmp_path / "straight" / "checkpoint-4" / JEPA_STATE).unlink()
    with pytest.raises(ValueError, match=f"no {JEPA_STATE} .*not a checkpoint of DLLMJEPATrainer"):
        trainer._load_from_checkpoint(str(tmp_path / "straight" / "checkpoint-4"))


def test_exports_and_checkpoints_load_with_automodel(tmp_path, make_model, rows, tokenizer):
    """save_model's folder and a checkpoint hold the backbone alone, as a Hugging Face model:
    AutoModel loads them and gives the trained backbone's logits."""
    trainer = DLLMJEPATrainer(make_model(), processing_class=tokenizer, train_dataset=dataset(rows),
                              args=arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    backbone = trainer.model.jepa.backbone.eval()
    ids = rows.input_ids[:2]
    with torch.no_grad():
        want = backbone(input_ids=ids).logits
        for folder in (tmp_path / "final", tmp_path / "checkpoint-2"):
            loaded = AutoModel.from_pretrained(folder).eval()
            assert torch.equal(loaded(input_ids=ids).logits, want), folder
    assert not (tmp_path / "final" / JEPA_STATE).exists()  # the export is the model, not a resume point


class MDLMLike(Trainer):
    """dllm's MDLMTrainer's shape: a Trainer subclass whose __init__ takes its own arguments
    first, and whose compute_loss is the MDLM loss."""

    def __init__(self, args, scheduler=None, *pargs, **kwargs):
        super().__init__(*pargs, args=args, **kwargs)
        self.alpha_scheduler = scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise AssertionError("the MDLM loss should have been replaced by DLLM-JEPA's")


def test_stacks_on_another_trainer_subclass(tmp_path, make_model, rows):
    """class JEPAMDLMTrainer(DLLMJEPATrainer, MDLMTrainer): both __init__s run, the loss is
    DLLM-JEPA's and the EMA target moves."""
    class JEPAMDLMTrainer(DLLMJEPATrainer, MDLMLike):
        pass

    trainer = JEPAMDLMTrainer(make_model(), jepa_config=JEPAConfig(ema_momentum=(0.5, 0.5)), scheduler="linear",
                              args=arguments(tmp_path, max_steps=1), train_dataset=dataset(rows))
    before = [p.detach().clone() for p in trainer.model.jepa.target_encoder.parameters()]
    trainer.train()
    assert trainer.alpha_scheduler == "linear"
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.jepa.target_encoder.parameters()))


def test_readme_example_runs_as_written(tmp_path):
    """The README's Trainer example, from a fresh process in an empty folder."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [code for code in re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M) if "DLLMJEPATrainer" in code]
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 25
    (tmp_path / "example.py").write_text(blocks[0])
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "out" / "hf").iterdir())
    assert "final" in folders and any(f.startswith("checkpoint-") for f in folders), folders
    assert AutoModel.from_pretrained(tmp_path / "out" / "hf" / "final") is not None
