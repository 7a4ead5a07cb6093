"""Reference outputs from transformers + PEFT, to compare the served adapters against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Reference:
    text: str
    # Smallest gap between the best and second-best logit over the generated steps. Where it is
    # tiny, two correct fp32 implementations (vLLM's kernels, PyTorch's) may pick different
    # tokens: summation order alone moves logits by ~1e-3 here.
    min_margin: float


def greedy_references(
    model_dir: Path,
    adapter_dirs: Sequence[Path | None],
    messages: list[dict[str, str]],
    max_new_tokens: int,
) -> list[Reference]:
    """Greedy completion of the chat `messages` for each adapter (None: the base model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    input_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    references = []
    for adapter_dir in adapter_dirs:
        model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        top2 = [torch.topk(scores[0], 2).values for scores in out.scores]
        margin = min(float(v[0] - v[1]) for v in top2)
        text = tokenizer.decode(out.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
        references.append(Reference(text, margin))
        if adapter_dir is not None:
            base = model.unload()  # the LoRA layers out, the base weights untouched
    return references
