"""One task per kind of run: its data, its model, the loss of a batch, its evaluation and its metric.

The kind (translation or language modelling) is decided once, by ``build_task``; the loop only calls
the task. Evaluation is teacher-forced loss and perplexity on a split, and for translation the BLEU
of decoded translations.
"""

from __future__ import annotations

import math

import sacrebleu
import torch

from data import DataError, load_lm_data, load_translation_data
from models import build_model
from models.transformer import sequence_loss
from trainer.config import ModelName


class Task:
    """What the two kinds share: a model built for the data's vocabulary, token-weighted evaluation."""

    metric: str  # the summary key (``test_<metric>``) a run is judged by
    metric_label: str
    higher_is_better: bool

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.data = self._load(cfg.data, seed)
        self.tokenizer = self.data.tokenizer

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model, self.tokenizer.vocab_size, self.tokenizer.pad_id)

    def train_batches(self, epoch: int, rank: int, world_size: int):
        """This rank's batches of an epoch: each rank takes every world_size-th one."""
        return self.data.batches("train", epoch=epoch, rank=rank, world_size=world_size)

    def train_loss(self, net, batch) -> torch.Tensor:
        """Label-smoothed cross-entropy per target token. ``net`` may be a DDP wrapper of the model."""
        logits, target = self._forward(net, batch)
        loss = sequence_loss(logits, target, self.tokenizer.pad_id, self.cfg.model.label_smoothing)
        return loss / batch.num_tokens

    @torch.no_grad()
    def evaluate(self, model, split: str, device, autocast) -> dict:
        was_training = model.training
        model.eval()
        nll_sum, tokens, outputs = 0.0, 0, []
        for batch in self.data.batches(split, shuffle=False):
            batch = batch.to(device)
            with autocast():
                nll = self._eval_batch(model, batch, split, outputs)
            nll_sum += nll.item()
            tokens += batch.num_tokens
        model.train(was_training)
        loss = nll_sum / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50)), **self._score(outputs, split)}

    @classmethod
    def selection_value(cls, summary: dict) -> float:
        """For sweepers, higher is better: the validation metric (of the averaged model where there is one)."""
        averaged = summary.get(f"valid_{cls.metric}_averaged")
        best = summary[f"valid_{cls.metric}"] if averaged is None else averaged
        return best if cls.higher_is_better else -best

    @classmethod
    def report(cls, summary: dict) -> str:
        """The line a finished run ends with."""
        return (f"test {cls.metric_label} {summary[f'test_{cls.metric}']:.2f} (averaged "
                f"{summary.get(f'test_{cls.metric}_averaged', float('nan')):.2f}), valid {cls.metric_label} "
                f"{summary[f'valid_{cls.metric}']:.2f}")

    # kind-specific ---------------------------------------------------------------------------
    def _load(self, data_cfg, seed):
        raise NotImplementedError

    def _forward(self, net, batch):
        raise NotImplementedError

    def _eval_batch(self, model, batch, split: str, outputs: list) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, outputs: list, split: str) -> dict:
        return {}

    def fsdp_blocks(self, model) -> list:
        raise NotImplementedError

    fsdp_forward_methods: tuple = ()


def decode_length(source_length: int, cap: int | None = None) -> int:
    """The most tokens a translation of a ``source_length``-token source (eos included) may take:
    1.5 times the source plus 10, at most ``cap`` (``trainer.eval_max_len`` in evaluation)."""
    length = int(1.5 * source_length) + 10
    return length if cap is None else min(cap, length)


class TranslationTask(Task):
    metric, metric_label, higher_is_better = "bleu", "BLEU", True
    fsdp_forward_methods = ("generate",)  # decoding calls encode/decode, not forward

    def _load(self, data_cfg, seed):
        return load_translation_data(data_cfg, seed=seed)

    def _forward(self, net, batch):
        return net(batch.src, batch.tgt_in), batch.tgt_out

    def _eval_batch(self, model, batch, split, outputs):
        nll = model.loss(batch.src, batch.tgt_in, batch.tgt_out)
        trainer = self.cfg.trainer
        max_len = decode_length(batch.src.shape[1], trainer.eval_max_len)
        ids = model.generate(batch.src, self.tokenizer.bos_id, self.tokenizer.eos_id, max_len,
                             trainer.beam_size, trainer.length_penalty)
        outputs += [(self.tokenizer.decode(h), self.data.targets[split][i]) for h, i in zip(ids, batch.indices)]
        return nll

    def _score(self, outputs, split):
        hypotheses, references = [h for h, _ in outputs], [r for _, r in outputs]
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score, "example": hypotheses[:1]}

    def fsdp_blocks(self, model):
        return [*model.encoder, *model.decoder]


class LanguageModelTask(Task):
    """Every target token of a split counted once: perplexity is exp(summed NLL / tokens)."""

    metric, metric_label, higher_is_better = "ppl", "perplexity", False

    def _load(self, data_cfg, seed):
        return load_lm_data(data_cfg, seed=seed)

    def _forward(self, net, batch):
        return net(batch.input), batch.target

    def _eval_batch(self, model, batch, split, outputs):
        return model.loss(batch.input, batch.target)

    def fsdp_blocks(self, model):
        return list(model.blocks)


def task_type(cfg) -> type[Task]:
    """The task class of ``cfg.model.name``, checking that ``cfg.data`` is data of that kind."""
    is_lm = cfg.model.name == ModelName.transformer_lm
    if is_lm != ("seq_len" in cfg.data):
        raise DataError(
            f"model.name={cfg.model.name.value} needs " + ("a language-modelling data option (data=builtin_lm, "
            "wikitext103, lm1b or local_lm)" if is_lm else "a translation data option (data=builtin, "
            "wmt14_en_fr, wmt14_en_de or local)") + f", got data.name={cfg.data.name}")
    return LanguageModelTask if is_lm else TranslationTask


def build_task(cfg, seed: int) -> Task:
    return task_type(cfg)(cfg, seed)
