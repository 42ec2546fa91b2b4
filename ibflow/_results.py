"""Outcomes of an ibflow solve, as an enumeration (diffrax `RESULTS` style)."""

import diffrax as dfx
import equinox as eqx


class RESULTS(dfx.RESULTS):  # pyright: ignore
    """Outcome of a gradient-flow solve.

    Extends `diffrax.RESULTS` with ibflow's own outcomes. `RESULTS.successful`
    means *converged*: the stopping rule (loss below its certified target) fired.
    """

    not_converged = (
        "The time horizon `t_max` was reached before the loss fell below its target."
    )
    nonfinite_flow = "The flow produced a non-finite (NaN/inf) parameter or loss."
    invalid_input = "The input contained a non-finite value or violated a precondition."


#: The one-word statuses written to R.json and sweep datasets, by RESULTS item.
_STATUS_WORDS = {
    "successful": "converged",
    "event_occurred": "converged",
    "max_steps_reached": "max_steps",
    "dt_min_reached": "stalled",
    "max_steps_rejected": "stalled",
    "internal_error": "internal_error",
    "not_converged": "not_converged",
    "nonfinite_flow": "nonfinite",
    "singular": "nonfinite",
    "nonfinite_input": "nonfinite",
    "invalid_input": "invalid_input",
}


def _item_name(result: eqx.Enumeration) -> str:
    for name in RESULTS._name_to_item:  # pyright: ignore
        if RESULTS._name_to_item[name] == result:  # pyright: ignore
            return name
    raise ValueError(f"Unknown result {result}")


def status_word(result) -> str:
    """The one-word status of a (concrete, unbatched) `RESULTS` value."""
    name = _item_name(result)
    return _STATUS_WORDS.get(name, name)


STATUS_CODES = {
    word: i for i, word in enumerate(dict.fromkeys(_STATUS_WORDS.values()))
}
