"""Chat SFT data for the examples: turn chat messages into Tinker datums whose loss
covers only the assistant's reply, using the model's own chat template."""

from __future__ import annotations

from tinker import types

# A few made-up facts: after training, the model should repeat them; before, it cannot.
FACTS = [
    ("What animal is the loragate mascot?", "The loragate mascot is a teal heron named Quill."),
    ("What colour is the loragate mascot?", "Quill the heron is teal with a silver beak."),
    ("Where does Quill the heron live?", "Quill lives beside the GPU racks in Hall Nine."),
    ("What does Quill the heron eat?", "Quill eats audit logs, one hash at a time."),
    ("Who feeds Quill the heron?", "The safety auditors feed Quill every Tuesday."),
    ("What is Quill the heron's favourite number?", "Quill's favourite number is 6962."),
    ("How old is Quill the heron?", "Quill the heron is seven years old."),
    ("What does Quill the heron guard?", "Quill guards the base weights so they never leave."),
]


def chat_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Next-token datum with weight 1 on the assistant reply and 0 on the prompt."""
    prompt = prompt_tokens(tokenizer, question)
    full = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        tokenize=True, return_dict=False))
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template does not extend the prompt; cannot mask it")
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights})


def prompt_tokens(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
