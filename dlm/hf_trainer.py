"""
DLLM-JEPA as the loss of a Hugging Face `transformers.Trainer`, for those who train with one.

`DLLMJEPATrainer` is a Trainer that trains the model it is given with DLLM-JEPA's objective
(dllm_jepa.py) instead of the model's own loss. Everything else is the Trainer's: arguments,
data loading, gradient accumulation, clipping, schedules, logging, checkpoints. It
1. wraps the model in `dllm_jepa.DLLMJEPA` (predictor, EMA target encoder): the Trainer's
   optimizer, built from the parameters that require grad, holds the backbone and the
   predictor, never the EMA copy;
2. computes the loss with DLLMJEPA.forward on each micro-batch (`compute_loss`);
3. updates the EMA target after each optimizer step (`UpdateTarget`, a TrainerCallback:
   on_step_end runs once per optimizer step, so N steps with gradient accumulation make N
   updates, not one per micro-batch), with train.py's momentum schedule over max_steps;
4. saves the backbone alone as a Hugging Face model, so AutoModel.from_pretrained loads every
   checkpoint and `save_model`'s folder; each checkpoint also holds what resuming needs that the
   backbone's files do not, the predictor and the EMA target (`dllm_jepa_state.pt`), read back
   by resume_from_checkpoint;
5. logs the loss's parts (diffusion, jepa, anchor, answer_loss, answer_accuracy) beside the loss.

Batches: `input_ids` (B, T) (prompt, answer, EOS padding: data.tokenize_examples' rows) with
`prompt_lengths` (B,) and optionally `answer_lengths` (B,); or `input_ids` with `labels` (B, T)
that are -100 over the prompt (the SFT convention of dllm and TRL), from which they are read.
No attention mask is used: a diffusion LM attends over the whole canvas, padding included.

Tested on one process (CPU); under DDP the wrapper is what DDP wraps, so the predictor's
gradients are averaged too. Not wired: Trainer's FSDP and DeepSpeed (train.py shards with FSDP2).
"""

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dlm.backbones import FAMILIES, mask_token_id_of
from dlm.sharding import truncated_forward
from dllm_jepa import DLLMJEPA, JEPAConfig, check

JEPA_STATE = "dllm_jepa_state.pt"  # in each checkpoint: every tensor of the wrapper but the backbone's
BACKBONE = "jepa.backbone."        # the backbone's keys in the Trainer's model's state dict
PARTS = ("diffusion", "jepa", "anchor", "answer_loss", "answer_accuracy")  # logged beside "loss"


def wrap(model, config: JEPAConfig, tokenizer=None, mask_token_id: int | None = None) -> DLLMJEPA:
    """DLLMJEPA around `model`. The mask id: given, else the config's or the tokenizer's (checked
    as backbones.py checks it); a family backbones.py knows adds its facts (Dream's shifted
    logits; where the blocks are, so that target passes stop at the embedding layer)."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if mask_token_id is None:
        mask_token_id = mask_token_id_of(model.config, tokenizer, family)
    facts = dict(shift_logits=family.shift_logits, truncated_forward=truncated_forward(family.blocks)) if family else {}
    return DLLMJEPA(model, config, mask_token_id, **facts)


class JEPAForTrainer(nn.Module):
    """DLLMJEPA as the Trainer's model. The Trainer reads its model's `config` as the Hugging
    Face config (special tokens, use_cache); DLLMJEPA's `config` is its JEPAConfig, so the
    Trainer gets this shell: the backbone's config, DLLMJEPA's forward and parameters."""

    def __init__(self, jepa: DLLMJEPA):
        super().__init__()
        self.jepa, self.config = jepa, jepa.backbone.config

    def forward(self, input_ids, prompt_lengths, answer_lengths=None):
        return self.jepa(input_ids, prompt_lengths, answer_lengths)


def batch_lengths(inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_lengths (B,), answer_lengths (B,) or None) of a batch: given, or read from labels
    that are -100 over the prompt (the prompt ends at the first scored label; every scored
    label counts as answer)."""
    if "prompt_lengths" in inputs:
        return inputs["prompt_lengths"], inputs.get("answer_lengths")
    check("labels" in inputs, f"a batch needs prompt_lengths (and answer_lengths) or labels (-100 over the "
                              f"prompt) beside input_ids; this one has {sorted(inputs)}")
    scored = inputs["labels"] != -100                                    # (B, T)
    return scored.int().argmax(1), scored.sum(1)


class UpdateTarget(TrainerCallback):
    """After each optimizer step: EMA target <- m * target + (1 - m) * online, m on the
    schedule of JEPAConfig.ema_momentum at (optimizer steps done) / max_steps, as in train.py."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.jepa.update_target(state.global_step, state.max_steps)


class DLLMJEPATrainer(Trainer):
    """transformers.Trainer with DLLM-JEPA's objective.

    model: the backbone, any model DLLMJEPA takes (`.logits` and `.hidden_states` from
    forward(input_ids=..., output_hidden_states=True)); jepa_config: the objective (default
    JEPAConfig() reading the middle block, as train.py does, for a family backbones.py knows);
    mask_token_id: default the model config's, else
    processing_class's. Every other argument is Trainer's, by keyword."""

    def __init__(self, model, *, jepa_config: JEPAConfig | None = None, mask_token_id: int | None = None,
                 **kwargs):
        family = FAMILIES.get(getattr(model.config, "model_type", None))
        default = JEPAConfig(embed_layer=(len(family.blocks(model)) + 1) // 2) if family else JEPAConfig()
        jepa = wrap(model, jepa_config or default, kwargs.get("processing_class"), mask_token_id)
        super().__init__(model=JEPAForTrainer(jepa), **kwargs)
        self.add_callback(UpdateTarget())
        # The dataset columns kept (remove_unused_columns): the batch, not DLLMJEPA.forward's arguments.
        self._signature_columns = ["input_ids", "prompt_lengths", "answer_lengths", "labels"]
        self.part_sums, self.part_count = torch.zeros(len(PARTS)), 0  # since the last logged row

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DLLMJEPA's loss on one micro-batch (the Trainer divides it by the accumulation steps)."""
        output = model(inputs["input_ids"], *batch_lengths(inputs))
        if model.training:
            parts = torch.stack([getattr(output, name).detach().float() for name in PARTS])
            self.part_sums = self.part_sums.to(parts.device) + parts
            self.part_count += 1
        return (output.loss, output) if return_outputs else output.loss

    def log(self, logs: dict, start_time: float | None = None):
        """Each training row (it has "loss") gets the mean of every part over the micro-batches
        since the previous row, as the Trainer's loss is their mean; averaged over processes."""
        if "loss" in logs and self.part_count:
            means = self.accelerator.reduce(self.part_sums / self.part_count, reduction="mean")
            logs = {**logs, **dict(zip(PARTS, means.tolist()))}
            self.part_sums, self.part_count = torch.zeros_like(self.part_sums), 0
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: DLLMJEPA's loss on the batch (random masks, as in training); no logits."""
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    # -- saving and resuming

    def _save(self, output_dir=None, state_dict=None):
        """Save the backbone alone as a Hugging Face model: the Trainer's own _save, run with the
        backbone as its model (save_pretrained, the tokenizer, the arguments)."""
        if state_dict is not None:  # a full state dict gathered by the Trainer: the backbone's part
            state_dict = {k.removeprefix(BACKBONE): v for k, v in state_dict.items() if k.startswith(BACKBONE)}
        wrapper, self.model = self.model, self.model.jepa.backbone
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.model = wrapper

    def _save_checkpoint(self, model, trial):
        """A Trainer checkpoint, and first, in its folder, the predictor and EMA target (the
        Trainer writes trainer_state.json last: a checkpoint that has it has them too)."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(BACKBONE)}
            torch.save(state, folder / JEPA_STATE)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: the backbone as the Trainer loads it, then predictor and EMA target exactly."""
        model = self.model if model is None else model
        path = Path(resume_from_checkpoint) / JEPA_STATE
        check(path.is_file(), f"{resume_from_checkpoint}: no {JEPA_STATE} (predictor and EMA target): not a "
                              "checkpoint of DLLMJEPATrainer; resume from one of its checkpoints")
        super()._load_from_checkpoint(resume_from_checkpoint, model.jepa.backbone)
        loaded = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        wrong = [k for k in loaded.missing_keys if not k.startswith(BACKBONE)] + loaded.unexpected_keys
        if wrong:
            raise ValueError(f"{path}: saved under another jepa_config ({', '.join(wrong[:2])} differ): resume with "
                             "the configuration it was trained with")

    def _load_best_model(self):
        """load_best_model_at_end: the best checkpoint, loaded as a resume loads it."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)
