"""Outcomes of an ibflow solve, as an enumeration (diffrax `RESULTS` style)."""

import diffrax as dfx
import equinox as eqx
import numpy as np


class RESULTS(dfx.RESULTS):  # pyright: ignore
    """Outcome of a gradient-flow solve.

    Extends `diffrax.RESULTS` with ibflow's own outcomes. `RESULTS.successful`
    means *converged*: the stopping rule (loss below its certified target) fired.
    """

    not_converged = (
        "The time horizon `t_max` was reached before the loss fell below its target."
    )
    nonfinite_flow = "The flow produced a non-finite (NaN/inf) parameter or loss."
    stalled = (
        "Most steps were rejected until the step budget ran out: the vector field is probably "
        "non-smooth along the flow or the flow is diverging; or (leaky-ReLU neuron) the flow met "
        "more kink events than its budget (`_kinks.EVENTS_PER_SAMPLE`·N + `EXTRA_EVENTS`, 8N + 64) allows."
    )
    invalid_input = "The input contained a non-finite value or violated a precondition."
    unstable = (
        "The discrete optimiser is unstable at this step size: the loss diverged, or the sharpness "
        "λ_max(∇²L) exceeded the stability bound (2/η for GD) at the end of the run, or the minimum it "
        "was meant to reach (e.g. the gradient flow's limit) is sharper than the bound, so the optimiser "
        "cannot converge to it."
    )
    dead_samples = (
        "The ReLU neuron's (slope ρ = 0) flow converged, but to a limit whose output is 0 on "
        "samples with a nonzero label: on the flat side of the ReLU (wᵀx_n < 0, where no gradient "
        "reaches them) or on its kink (wᵀx_n = 0, held there); the loss stays above its target: "
        "a non-interpolating stationary point, outside every implicit-bias theorem (square loss)."
    )


#: The one-word statuses written to R.json and sweep datasets, by RESULTS item.
_STATUS_WORDS = {
    "successful": "converged",
    "event_occurred": "converged",
    "max_steps_reached": "max_steps",
    "dt_min_reached": "stalled",
    "max_steps_rejected": "stalled",
    "internal_error": "internal_error",
    "not_converged": "not_converged",
    "stalled": "stalled",
    "nonfinite_flow": "nonfinite",
    "singular": "nonfinite",
    "nonfinite_input": "nonfinite",
    "invalid_input": "invalid_input",
    "unstable": "unstable",
    "dead_samples": "dead_samples",
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


def status_words(result) -> np.ndarray:
    """One-word statuses of a (possibly batched, concrete) `RESULTS` value, as a str array."""
    index = {int(item._value): _STATUS_WORDS.get(name, name)  # pyright: ignore
             for name, item in RESULTS._name_to_item.items()}  # pyright: ignore
    values = np.asarray(result._value)  # pyright: ignore
    return np.vectorize(index.__getitem__, otypes=[object])(values).astype(str)


STATUS_CODES = {
    word: i for i, word in enumerate(dict.fromkeys(_STATUS_WORDS.values()))
}
