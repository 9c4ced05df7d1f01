"""What each user spent, and the token budget that caps it: a turn's tokens as counted (the agent's
report, or an estimate), the UTC periods a budget runs over, the check before the agent, and the
report of GET /api/<user_id>/usage. Imports no Flask: the chat service and the routes share it."""
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy.orm import Session

from chatapp import queries
from chatapp.errors import QuotaExceeded

DAY, MONTH = "day", "month"
# An agent that reports no usage is counted ceil(characters / 4) of what it was sent and of what it
# answered: the rule of thumb OpenAI gives for English text.
CHARACTERS_PER_TOKEN = 4
# One turn's reported figure counts at most this: an agent's nonsense must not overflow a day's sum.
MAX_TOKENS_A_TURN = 10**9


@dataclass(frozen=True)
class CountedUsage:
    """A turn's tokens as the counters add them."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool


def _reported_tokens(usage: dict | None, name: str) -> int | None:
    value = usage.get(name) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, MAX_TOKENS_A_TURN)


def counted_usage(usage: dict | None, context: list[dict], answer: str) -> CountedUsage:
    """The agent's `prompt_tokens` and `completion_tokens` when it reported both as whole numbers;
    otherwise the estimate of ceil(characters / 4) of the context sent (system prompt, kept history
    and new message) and of the answer."""
    prompt, completion = _reported_tokens(usage, "prompt_tokens"), _reported_tokens(usage, "completion_tokens")
    if prompt is not None and completion is not None:
        return CountedUsage(prompt, completion, estimated=False)
    context_chars = sum(len(message["content"]) for message in context)
    return CountedUsage(math.ceil(context_chars / CHARACTERS_PER_TOKEN), math.ceil(len(answer) / CHARACTERS_PER_TOKEN),
                        estimated=True)


@dataclass(frozen=True)
class Period:
    """A UTC calendar day or month: its first and last day, and when the next one starts."""

    name: str
    first_day: date
    last_day: date

    @property
    def resets_at(self) -> datetime:
        return datetime.combine(self.last_day + timedelta(days=1), time(), tzinfo=timezone.utc)


def utc_day(now: datetime) -> date:
    """The UTC date of `now` (whatever the time zone it is given in, or the process's)."""
    return now.astimezone(timezone.utc).date()


def period_of(name: str, now: datetime) -> Period:
    """The UTC day or month that `now` falls in."""
    today = utc_day(now)
    if name == DAY:
        return Period(DAY, today, today)
    first = today.replace(day=1)
    next_month = (first + timedelta(days=32)).replace(day=1)
    return Period(MONTH, first, next_month - timedelta(days=1))


@dataclass(frozen=True)
class BudgetStanding:
    """One user's budget in the current period: the limit (None: unlimited), what was used, when
    the period resets."""

    limit: int | None
    period: Period
    used: int

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    @property
    def used_up(self) -> bool:
        return self.limit is not None and self.used >= self.limit


class Budget:
    """TOKEN_BUDGET: every user's limit a UTC day or month (None: unlimited, so that only the users'
    own limits apply), or no budget at all (period None: nothing is read before a turn)."""

    def __init__(self, default_limit: int | None = None, period: str | None = None):
        self.default_limit = default_limit
        self.period = period

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def standing(self, session: Session, user_id: str, now: datetime) -> BudgetStanding | None:
        """The user's budget now (one query), or None when there is no budget."""
        if not self.enabled:
            return None
        period = period_of(self.period, now)
        used, has_own_limit, own_limit = queries.budget_standing(session, user_id, period.first_day, period.last_day)
        return BudgetStanding(own_limit if has_own_limit else self.default_limit, period, used)

    def check(self, session: Session, user_id: str, now: datetime) -> None:
        """429 quota_exceeded, with the seconds until the period resets, when the user has used
        their whole budget. Turns already in flight are not counted: they may pass it."""
        standing = self.standing(session, user_id, now)
        if standing is not None and standing.used_up:
            raise QuotaExceeded(retry_after=math.ceil((standing.period.resets_at - now).total_seconds()))


def day_usage(user_id: str, answered_at: datetime, counted: CountedUsage) -> dict:
    """What a stored turn adds to its user's counters of the UTC day it was answered: one row, an
    upsert in the turn's own transaction (queries.finish_conversation_turn, insert_conversation),
    so that its cost does not grow with the user's history."""
    return queries.day_usage(user_id, utc_day(answered_at), counted.prompt_tokens, counted.completion_tokens,
                             counted.estimated)


@dataclass(frozen=True)
class UsageReport:
    """GET /api/<user_id>/usage: the totals from `first_day` to `last_day`, the days with turns,
    and the budget standing now (None when no limit applies to the user)."""

    first_day: date
    last_day: date
    days: list[queries.UsageDay]
    budget: BudgetStanding | None

    def _total(self, name: str) -> int:
        return sum(getattr(day, name) for day in self.days)

    turns = property(lambda self: self._total("turns"))
    prompt_tokens = property(lambda self: self._total("prompt_tokens"))
    completion_tokens = property(lambda self: self._total("completion_tokens"))
    total_tokens = property(lambda self: self._total("total_tokens"))
    estimated_turns = property(lambda self: self._total("estimated_turns"))


class UsageLedger:
    """The app's budget and clock, for the usage report (the chat service has the same two)."""

    def __init__(self, budget: Budget, clock: Callable[[], datetime]):
        self.budget = budget
        self.clock = clock

    def default_range(self) -> Period:
        """What GET /usage reports without `from` and `to`: the budget's current period, or the
        current UTC month without a budget."""
        return period_of(self.budget.period or MONTH, self.clock())

    def report(self, session: Session, user_id: str, first_day: date, last_day: date) -> UsageReport:
        """The user's usage from `first_day` to `last_day` (at most 366 days: one query of that
        many rows at the most), and their budget now."""
        standing = self.budget.standing(session, user_id, self.clock())
        return UsageReport(first_day, last_day, queries.usage_days(session, user_id, first_day, last_day),
                           standing if standing is not None and standing.limit is not None else None)
