"""The rules a request must meet before it is queued, shared by the engine and the API ingress
(which applies them early, to answer 400 without a trip to a replica)."""


class ContextLengthError(ValueError):
    """Prompt plus completion exceed the model's context length."""


def max_model_len(requested: int | None, model_max: int) -> int:
    """The context length served: as asked, never beyond what the model was built for."""
    return min(requested or model_max, model_max)


def prompt_token_ids(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Token ids of a text prompt (with BOS) or a checked token-id prompt; ValueError if empty or
    outside the vocabulary."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=True) if prompt else []
    else:
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def completion_budget(num_prompt_tokens: int, max_tokens: int | None, context_len: int) -> int:
    """max_tokens, or all the room left when None; ContextLengthError naming both lengths if the
    prompt and the completion do not fit."""
    budget = max_tokens if max_tokens is not None else context_len - num_prompt_tokens
    asked = max(budget, 1)
    if num_prompt_tokens + asked > context_len:
        raise ContextLengthError(
            f"this model's maximum context length is {context_len} tokens, but {num_prompt_tokens + asked} "
            f"were requested ({num_prompt_tokens} in the prompt, {asked} for the completion); shorten the "
            "prompt or lower max_tokens"
        )
    return budget
