"""The one place where Python values become wire messages and back: one function per direction
for every message, each pair round-trip tested (tests/unit/test_wire.py). Wide messages have a
dataclass in protos/messages.py and are built with keywords; messages of one to three fields go
from plain values. Messages nested in others (DeviceProfile, ExpertAssignment, DecodeSpan,
ExpertHolders, AgentAddress) are converted with them; the empty ones (InfoRequest,
CacheStateRequest, ReleaseReply, Ack) carry nothing to convert. Expert ids stay flat ints
(layer * num_experts + index) where the wire has them so: `expert_to_wire`/`expert_from_wire`.

Split by plane (tensors.py, control.py, peer.py); everything is imported from here.
"""

from protos.convert.control import *  # noqa: F403
from protos.convert.peer import *  # noqa: F403
from protos.convert.tensors import *  # noqa: F403
