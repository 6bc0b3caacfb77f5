"""What one round of training exchanged, as the wrappers of a transfer strategy share it.

Several wrappers learn part of a round (what each node was sent, which replies were merged, LoRA's
merge error) and one reports it: they meet in the round's ``Exchange``, a named record instead of
a tuple, kept in the run's ``Exchanges`` from the round's configuration until its report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message


@dataclass
class Exchange:
    """One round's training exchange.

    Attributes
    ----------
    sent : dict
        Node -> the travelling arrays it was sent (the adapters cut to its rank, where it declared one).
    bytes_down : int
        The bytes of every array sent (base weights under stacked LoRA included).
    merged : list of Message
        The replies the inner strategy merged.
    declined : int
        The nodes that declined to train.
    problems : list of str
        Why each other node's update is missing from the merge (the round's ``client_errors``).
    all_declined : bool
        Every node sent the round declined: nothing was merged and nothing failed.
    merge_error : dict
        LoRA's merge error per adapted layer (``RoundReport.merge_error``); empty when not measured.
    """

    sent: dict[int, ArrayRecord] = field(default_factory=dict)
    bytes_down: int = 0
    merged: list[Message] = field(default_factory=list)
    declined: int = 0
    problems: list[str] = field(default_factory=list)
    all_declined: bool = False
    merge_error: dict[str, float] = field(default_factory=dict)


class Exchanges(dict[int, Exchange]):
    """Round -> its ``Exchange``, from its configuration until its report takes it out."""

    def of(self, server_round: int) -> Exchange:
        """The exchange of ``server_round``, begun if it is not yet."""
        return self.setdefault(server_round, Exchange())
