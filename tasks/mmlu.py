"""
MMLU (Hendrycks et al., 2021) as a sanity check: the likelihood of each answer letter at one
masked position after the prompt (exact for a one-token answer), zero- or few-shot.
"""

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm import data
from dlm.sampler import aligned_logits, conventions, left_pad
from tasks.common import Shard, fit_prompt, map_batches, max_positions, non_empty


LETTERS = "ABCD"


@dataclass
class Question:
    subject: str
    question: str
    choices: list
    answer: int  # 0..3


def read_mmlu_csv(path: Path) -> list[Question]:
    """One subject's CSV: either with the header question,choice0..3,answer (answer 0-3) or
    the original headerless layout (question, A, B, C, D, letter)."""
    subject = re.sub(r"_(dev|val|test)$", "", path.stem)
    try:
        rows = list(csv.reader(io.StringIO(data.read_text(path), newline="")))  # "": quoted newlines stay
    except csv.Error as e:  # e.g. a field past csv's size limit: an unclosed quote swallows the file
        raise ValueError(f"{path}: not a readable CSV file ({e}); check its quotes") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
        rows = rows[1:]
    questions = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) != 6:
            raise ValueError(f"{path} row {lineno}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
        answer = row[5].strip()
        index = "0123".find(answer) if answer in ("0", "1", "2", "3") else LETTERS.find(answer.upper())
        if not answer or index < 0:
            raise ValueError(f"{path} row {lineno}: answer {answer!r} is neither 0-3 nor A-D")
        questions.append(Question(subject, row[0], row[1:5], index))
    return non_empty(questions, path)


def load_mmlu(path: Path) -> list[Question]:
    """A CSV file or a folder of them (one per subject)."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise ValueError(f"{path}: no MMLU .csv file(s) there")
    return [q for f in files for q in read_mmlu_csv(f)]


def mmlu_block(q: Question, with_answer: bool) -> str:
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question}{choices}\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def mmlu_prompt(q: Question, exemplars: list[Question]) -> str:
    """The standard MMLU format (Hendrycks et al.): a subject header, solved exemplars, the
    question, "Answer:"."""
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(mmlu_block(e, True) for e in exemplars) + mmlu_block(q, False)


def letter_tokens(tokenizer, prompt: str):
    """(prompt ids, the four letters' ids) such that prompt ids + [letter id] is exactly how
    the tokenizer writes the prompt followed by that letter. BPE vocabularies fold the space
    into the letter (" A"); byte-level ones need the space in the prompt."""
    for text, sep in ((prompt, " "), (prompt + " ", "")):
        base = tokenizer(text)["input_ids"]
        full = [tokenizer(text + sep + letter)["input_ids"] for letter in LETTERS]
        if all(len(f) == len(base) + 1 and f[:-1] == base for f in full):
            return base, [f[-1] for f in full]
    raise ValueError("the tokenizer does not write the answer letters as one token after "
                     "'Answer:', so one masked position cannot score them")


@torch.no_grad()
def mmlu_accuracy(backbone, questions: list[Question], shots: int = 0,
                  exemplars: list[Question] = (), batch_size: int = 8, shard: Shard = Shard()) -> dict:
    """Accuracy by argmax over the four letters' logits at one masked position after the
    prompt. Few-shot exemplars come from the same subject, in file order; when the model's
    context cannot hold them all, exemplars are dropped from the front (counted). Under
    torchrun (shard), each process answers a share of the batches (map_batches) and every
    process scores all the choices, gathered in order."""
    model, tokenizer = backbone.model.eval(), backbone.tokenizer
    device = next(model.parameters()).device
    by_subject = {}
    for e in exemplars:
        by_subject.setdefault(e.subject, []).append(e)
    limit = max_positions(model)
    rows, letters, shots_used = [], [], []
    for q in questions:
        pool = by_subject.get(q.subject, [])[:shots]
        while True:  # fewer exemplars until prompt + the masked answer fit
            ids, ids_of_letters = letter_tokens(tokenizer, mmlu_prompt(q, pool))
            if limit is None or len(ids) < limit or not pool:
                break
            pool = pool[1:]
        rows.append((fit_prompt(ids, limit - 1) if limit else ids) + [backbone.mask_token_id])
        letters.append(ids_of_letters)
        shots_used.append(len(pool))
    pad = backbone.eos_token_id

    def choose(start, stop):  # the letter the model picks for questions start..stop-1
        ids, attention = left_pad(rows[start:stop], pad)   # mask last: column -1
        attention = attention if not bool(attention.all()) else None
        logits = aligned_logits(model, ids.to(device), None if attention is None else attention.to(device),
                                **conventions(backbone))[:, -1]                      # (b, V)
        return logits.gather(1, torch.tensor(letters[start:stop], device=device)).argmax(1).tolist()

    choices = [c for batch in map_batches(choose, len(rows), batch_size, shard, "mmlu") for c in batch]
    correct, by_subject_hits = [], {}
    for q, c in zip(questions, choices):
        correct.append(c == q.answer)
        by_subject_hits.setdefault(q.subject, []).append(c == q.answer)
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "shots": shots,
            "mean_shots_used": sum(shots_used) / max(len(shots_used), 1),
            "by_subject": {s: sum(h) / len(h) for s, h in sorted(by_subject_hits.items())},
            "answers": [{"subject": q.subject, "prediction": LETTERS[c], "reference": LETTERS[q.answer]}
                        for q, c in zip(questions, choices)]}
