"""Exact match by teacher forcing = greedy decoding on real held-out math questions (SmolLM2).

Slow (minutes on 2 CPU cores): set ENTROLORA_SFT_RUN to a run folder of `entrolora train --task
sft` to score its adapter, else a LoRA r=8 adapter is trained for 10 steps here first.
"""

from __future__ import annotations

import os

import pytest
import torch

from entrolora.data import sft as S
from entrolora.job import sft as J
from entrolora.job import train_run
from entrolora.job.generate import load_answerer
from test_sft import greedy_matches

N = 200


@pytest.mark.slow
def test_teacher_forced_exact_match_equals_greedy_on_real_math(tmp_path):
    from entrolora import data as D

    try:
        D.smollm2_gguf()
    except D.AssetMissing as e:
        pytest.skip(str(e))
    run = os.environ.get("ENTROLORA_SFT_RUN")
    if not run:
        cfg = J.sft_config(method="lora", max_steps=10, output=str(tmp_path / "run"),
                           progress=False, report=False)  # fmt: skip
        run = train_run(cfg).output
    a = load_answerer(run)
    test = J._subset(S.load_math("test"), N, 0)  # the job's fixed subset of held-out questions
    toks = S.tokenize(a.tokenizer, test, 96, "auto")
    eos, pad = a.tokenizer.eos_token_id, a.tokenizer.pad_token_id
    with torch.no_grad():
        ok, _, _ = J.teacher_forced(a.model, toks, 32, torch.device("cpu"), pad)
        greedy = greedy_matches(a.model, toks, eos=eos, pad=pad)
    differ = [i for i in range(N) if ok[i] != greedy[i]]
    print(f"\n{N} held-out questions, {run}: teacher-forced exact match {sum(ok)}, greedy "
          f"{sum(greedy)}, rows that differ: {differ}")  # fmt: skip
    assert not differ
