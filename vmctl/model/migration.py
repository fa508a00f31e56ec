"""The values of a live migration: the caller's request (options, convergence policy, TLS, storage
copy, every cross-field rule checked in one place), what QEMU is set to, progress, escalations, result.

``Step`` looks like ``model.status.RunState`` and ``MigrationResult.from_qmp`` like the stats'
``from_qmp`` readers to the duplicate finder: an enum of QEMU's words and a reader of one QMP
reply each, with nothing to share but their shape.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

import attrs

from vmctl.errors import InvalidArgument
from vmctl.model.tls import TLSCreds

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: QEMU's own limits: downtime-limit is at most 2000 s; a CPU throttle is 1-99 percent.
MAX_DOWNTIME_LIMIT_MS = 2_000_000
#: QEMU's default downtime-limit (ms), what a migration gets when nobody sets one.
DEFAULT_DOWNTIME_LIMIT_MS = 300
#: The auto-converge parameters that hold QEMU's throttle at its 1% minimum until the policy
#: lets it go (QEMU fixes capabilities when the migration starts, parameters it reads at each pass).
THROTTLE_HELD = {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}


def _positive_int(value: object, name: str, *, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be a positive whole number, not {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{name} must be at most {maximum}, not {value!r}")


def check_downtime_limit(downtime_limit: int | None) -> int | None:
    """QEMU's downtime-limit (ms): None, or a whole number of 1 to 2000 s."""
    if downtime_limit is not None:
        _positive_int(downtime_limit, "downtime_limit", maximum=MAX_DOWNTIME_LIMIT_MS)
    return downtime_limit


class Step(enum.Enum):
    """An escalation of the convergence policy, in the order it takes them."""

    #: XBZRLE: a page sent again goes as its difference to the copy sent before. On from the start,
    #: as QEMU sizes its cache only when a migration starts (a resize during one is taken, not applied).
    COMPRESSION = "compression"
    #: Raise QEMU's downtime-limit to what the last pass needs, up to ``max_downtime_ms``.
    DOWNTIME = "downtime"
    #: Switch to postcopy: the guest runs on the target, which fetches what is left on demand.
    POSTCOPY = "postcopy"
    #: Let QEMU's auto-converge throttle the guest's vCPUs on the source, more at each pass.
    THROTTLE = "throttle"
    #: QEMU's dirty-limit (KVM's dirty ring): asked for, never taken in this version.
    DIRTY_LIMIT = "dirty-limit"


@attrs.frozen(kw_only=True)
class ConvergencePolicy:
    """What a migration may do to finish in time (``vm.migrate(finish_within=...)``).

    At each pass vmctl predicts from QEMU's figures whether precopy will end in time, and when it
    will not, takes the next step: a longer downtime (up to ``max_downtime_ms``), then postcopy
    (when allowed and possible), else throttling the guest (when allowed and safe on this QEMU).
    A migration still running at ``finish_within`` seconds is cancelled: the source runs on.
    ``allow_compression`` has XBZRLE on from the start where it is safe (its cache costs the
    source host a quarter of the guest's RAM, 16-256 MiB, while the migration runs)."""

    finish_within: float
    max_downtime_ms: int = DEFAULT_DOWNTIME_LIMIT_MS
    allow_throttle: bool = True
    allow_postcopy: bool = False
    allow_compression: bool = True
    max_throttle: int = 99

    def __attrs_post_init__(self) -> None:
        if (
            not isinstance(self.finish_within, (int, float))
            or isinstance(self.finish_within, bool)
            or not self.finish_within > 0
        ):
            raise InvalidArgument(f"finish_within must be a positive number of seconds, not {self.finish_within!r}")
        _positive_int(self.max_downtime_ms, "max_downtime_ms", maximum=MAX_DOWNTIME_LIMIT_MS)
        _positive_int(self.max_throttle, "max_throttle", maximum=99)
        for name in ("allow_throttle", "allow_postcopy", "allow_compression"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name} must be True or False, not {getattr(self, name)!r}")


@attrs.frozen(kw_only=True)
class Skipped:
    """A step the policy will not take on this migration, and why (logged when it starts)."""

    step: Step
    reason: str


@attrs.frozen(kw_only=True)
class Escalation:
    """A step the policy took, with the figures that made it take it."""

    step: Step
    at_s: float  # seconds since the migration began
    passes: int
    remaining: int  # bytes left to send in this pass
    dirty_rate: int  # bytes per second the guest dirtied in the last pass
    bandwidth: int  # bytes per second the link carried
    needed_downtime_ms: int  # what sending the last pass's dirty memory at once would take
    throttle_percent: int
    change: str  # what was set, in words
    reason: str


@attrs.frozen(kw_only=True)
class MigrationOptions:
    """What QEMU's migration is set to (capabilities and parameters on each side), made from a
    ``MigrationRequest`` and what the convergence policy's plan adds."""

    postcopy: bool = False
    auto_converge: bool = False
    #: Auto-converge on with the throttle held at 1% (``THROTTLE_HELD``) until the policy lets it go.
    throttle_held: bool = False
    bandwidth: int | None = None  # bytes per second
    downtime_limit: int | None = None  # milliseconds
    pause_before_switchover: bool = False
    multifd_channels: int | None = None
    xbzrle: bool = False
    xbzrle_cache: int | None = None  # bytes
    copy_storage: bool = False
    #: TLS: the ids of the credentials objects on each side, and the name the target's
    #: certificate must bear (the host the source connects to).
    tls_server: str | None = None
    tls_client: str | None = None
    tls_hostname: str | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("bandwidth", "multifd_channels", "xbzrle_cache"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(value, name)
        check_downtime_limit(self.downtime_limit)

    @classmethod
    def of(
        cls, request: MigrationRequest, *, tls_server: str | None, tls_client: str | None, tls_hostname: str | None
    ) -> MigrationOptions:
        """What ``request`` sets in QEMU, with the ids of its TLS credentials objects (loaded by the VM)."""
        taken = {name: getattr(request, name) for name in _SET_IN_QEMU}
        return cls(**taken, tls_server=tls_server, tls_client=tls_client, tls_hostname=tls_hostname)

    def capabilities(self, *, source: bool) -> dict[str, bool]:
        caps = {"events": True, "postcopy-ram": self.postcopy, "multifd": bool(self.multifd_channels)}
        if not source:
            # With disks copied over NBD, the target must not take its images over (lock and
            # activate them) before the source's mirrors have ended: not until `cont`.
            caps["late-block-activate"] = self.copy_storage
        if source:
            caps.update(
                {
                    "auto-converge": self.auto_converge or self.throttle_held,
                    "pause-before-switchover": self.pause_before_switchover,
                    "xbzrle": self.xbzrle,
                }
            )
        return caps

    def parameters(self, *, source: bool) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if not source and self.tls_server is not None:
            params["tls-creds"] = self.tls_server
        if source and self.tls_client is not None:
            params["tls-creds"] = self.tls_client
            params["tls-hostname"] = self.tls_hostname or ""
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        if source and self.bandwidth is not None:
            params["max-bandwidth"] = self.bandwidth
        if source and self.downtime_limit is not None:
            params["downtime-limit"] = self.downtime_limit
        if source and self.throttle_held:
            params.update(THROTTLE_HELD)
        if source and self.xbzrle and self.xbzrle_cache is not None:
            params["xbzrle-cache-size"] = self.xbzrle_cache
        return params


class MigrationKeywords(TypedDict, total=False):
    """The keyword form of a ``MigrationRequest`` (``vm.migrate(target, postcopy=True, ...)``): its
    fields, with the convergence policy's spelled out (``finish_within`` and what goes with it)."""

    listen: tuple[str, int] | None
    postcopy: bool
    auto_converge: bool
    bandwidth: int | None
    downtime_limit: int | None
    pause_before_switchover: bool
    multifd_channels: int | None
    resume_target: bool
    stop_source: bool
    copy_storage: bool
    storage_timeout: float
    tls: TLSCreds | None
    target_tls: TLSCreds | None
    finish_within: float | None
    max_downtime_ms: int | None
    allow_throttle: bool
    allow_postcopy: bool
    allow_compression: bool


#: The fields of a ``MigrationRequest`` that ``MigrationOptions`` sets in QEMU as they are.
_SET_IN_QEMU = (
    "postcopy",
    "auto_converge",
    "bandwidth",
    "downtime_limit",
    "pause_before_switchover",
    "multifd_channels",
    "copy_storage",
)
#: The keywords that make the convergence policy, and their values when there is none.
_POLICY_KEYWORDS = {"max_downtime_ms": None, "allow_throttle": True, "allow_postcopy": False, "allow_compression": True}


@attrs.frozen(kw_only=True)
class MigrationRequest:
    """A live migration as the caller asks for it, passed whole from ``vm.migrate`` down to the
    operation; ``vm.migrate(target, request)``, or ``vm.migrate(target, **keywords)`` through
    ``MigrationRequest.of``. Every rule between its fields is checked here, before anything is sent
    (those that depend on the target, a VM or a URI, are checked where the target is known).

    * ``listen``: (host, port) the target listens on over TCP (default: a unix socket in its run dir).
    * ``postcopy`` (may switch by hand), ``auto_converge``, ``bandwidth`` (bytes/s),
      ``downtime_limit`` (ms), ``pause_before_switchover``, ``multifd_channels``: QEMU's own.
    * ``resume_target``, ``stop_source``: what happens at the end (the target runs, the source quits).
    * ``copy_storage``: mirror the disks whose image differs on the target into its NBD exports
      first, in sync within ``storage_timeout`` seconds.
    * ``tls``: credentials for an encrypted stream (the source's; the target's are ``target_tls``,
      default the same).
    * ``policy``: the convergence policy (``finish_within``), or None."""

    listen: tuple[str, int] | None = None
    postcopy: bool = False
    auto_converge: bool = False
    bandwidth: int | None = None
    downtime_limit: int | None = None
    pause_before_switchover: bool = False
    multifd_channels: int | None = None
    resume_target: bool = True
    stop_source: bool = True
    copy_storage: bool = False
    storage_timeout: float = 600.0
    tls: TLSCreds | None = None
    target_tls: TLSCreds | None = None
    policy: ConvergencePolicy | None = None

    def __attrs_post_init__(self) -> None:
        for flag in ("postcopy", "auto_converge", "pause_before_switchover", "resume_target", "stop_source"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidArgument(f"{flag} must be True or False, not {getattr(self, flag)!r}")
        if not isinstance(self.copy_storage, bool):
            raise InvalidArgument(f"copy_storage must be True or False, not {self.copy_storage!r}")
        for name in ("bandwidth", "multifd_channels"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        check_downtime_limit(self.downtime_limit)
        if self.listen is not None and not (
            isinstance(self.listen, tuple)
            and len(self.listen) == 2
            and isinstance(self.listen[0], str)
            and isinstance(self.listen[1], int)
            and not isinstance(self.listen[1], bool)
        ):
            raise InvalidArgument(f"listen must be a (host, port) tuple, not {self.listen!r}")
        timeout = self.storage_timeout
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
            raise InvalidArgument(f"storage_timeout must be a positive number of seconds, not {timeout!r}")
        for name in ("tls", "target_tls"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), TLSCreds):
                raise InvalidArgument(f"{name} must be TLSCreds, not {type(getattr(self, name)).__name__}")
        if self.policy is not None and not isinstance(self.policy, ConvergencePolicy):
            raise InvalidArgument(f"policy must be a ConvergencePolicy, not {type(self.policy).__name__}")
        # Between the fields:
        if self.postcopy and self.multifd_channels:
            raise InvalidArgument("postcopy and multifd cannot be combined in this QEMU")
        if self.target_tls is not None and self.tls is None:
            raise InvalidArgument("target_tls needs tls (the source's credentials)")
        if self.policy is not None:
            if self.auto_converge:
                raise InvalidArgument("auto_converge is the convergence policy's to use: give allow_throttle instead")
            if self.downtime_limit is not None and self.downtime_limit > self.policy.max_downtime_ms:
                raise InvalidArgument(
                    f"downtime_limit {self.downtime_limit} is above max_downtime_ms {self.policy.max_downtime_ms}"
                )

    @classmethod
    def of(cls, request: MigrationRequest | None = None, /, **options: Unpack[MigrationKeywords]) -> MigrationRequest:
        """The one keyword adapter: ``request`` as it is, or one made of ``options`` (the policy's
        keywords, ``finish_within`` and the ``max_downtime_ms``/``allow_*`` that need it, make
        its ``policy``). ``InvalidArgument`` for both at once, or for a keyword it does not know."""
        if request is not None:
            if options:
                raise InvalidArgument(f"give a MigrationRequest or keywords, not both ({', '.join(sorted(options))})")
            if not isinstance(request, MigrationRequest):
                raise InvalidArgument(f"a migration request is a MigrationRequest, not {type(request).__name__}")
            return request
        keywords: dict[str, Any] = dict(options)
        unknown = sorted(set(keywords) - set(MigrationKeywords.__annotations__))
        if unknown:
            raise InvalidArgument(f"migrate() takes no {', '.join(unknown)}")
        finish_within = keywords.pop("finish_within", None)
        policy = {name: keywords.pop(name) for name in _POLICY_KEYWORDS if name in keywords}
        if finish_within is None:
            if any(value != _POLICY_KEYWORDS[name] for name, value in policy.items()):
                raise InvalidArgument(
                    "max_downtime_ms, allow_throttle, allow_postcopy and allow_compression need finish_within"
                )
            return cls(**keywords)
        if policy.get("max_downtime_ms") is None:
            policy.pop("max_downtime_ms", None)
        return cls(policy=ConvergencePolicy(finish_within=finish_within, **policy), **keywords)


@attrs.frozen(kw_only=True)
class MigrationProgress:
    """A snapshot of ``query-migrate`` on the source, for a progress bar (``wait(on_progress=)``)."""

    status: str
    total_time_ms: int
    transferred: int  # bytes sent so far
    remaining: int  # bytes left to send in this pass
    total: int  # the guest's RAM
    dirty_rate: int  # bytes per second the guest dirtied in the last pass
    bandwidth: int  # bytes per second the link carries
    mbps: float
    passes: int
    throttle_percent: int  # how much auto-converge slows the guest's vCPUs
    expected_downtime_ms: int  # QEMU's estimate, were it to stop the guest now
    #: Seconds until the end as vmctl predicts it; None while it cannot tell (or never, as things go).
    eta_s: float | None = None
    #: XBZRLE: pages sent as their difference to the last copy, and the share of pages sent
    #: again that were not in its cache (sent whole).
    compressed_pages: int = 0
    compression_cache_miss_rate: float = 0.0

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> MigrationProgress:
        ram = info.get("ram", {})
        xbzrle = info.get("xbzrle-cache", {})
        mbps = float(ram.get("mbps", 0.0))
        return cls(
            status=str(info.get("status", "none")),
            total_time_ms=int(info.get("total-time", 0)),
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            total=int(ram.get("total", 0)),
            dirty_rate=int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096)),
            bandwidth=int(mbps * 1e6 / 8),
            mbps=mbps,
            passes=int(ram.get("dirty-sync-count", 0)),
            throttle_percent=int(info.get("cpu-throttle-percentage", 0)),
            expected_downtime_ms=int(info.get("expected-downtime", 0)),
            compressed_pages=int(xbzrle.get("pages", 0)),
            compression_cache_miss_rate=float(xbzrle.get("cache-miss-rate", 0.0)),
        )


@attrs.frozen(kw_only=True)
class MigrationResult:
    status: str
    total_time_ms: int
    downtime_ms: int
    setup_time_ms: int
    transferred: int
    postcopy: bool
    #: What the convergence policy did, in order, and what it would not do on this QEMU.
    escalations: tuple[Escalation, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    @classmethod
    def from_qmp(
        cls,
        info: Mapping[str, Any],
        *,
        postcopy: bool,
        escalations: tuple[Escalation, ...] = (),
        skipped: tuple[Skipped, ...] = (),
    ) -> MigrationResult:
        return cls(
            status=str(info.get("status")),
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            setup_time_ms=int(info.get("setup-time", 0)),
            transferred=int(info.get("ram", {}).get("transferred", 0)),
            postcopy=postcopy,
            escalations=escalations,
            skipped=skipped,
        )
