"""Is a difference between two arms real? Paired differences over seeds and a Student t interval.

Runs of the same seed share initialisation and data order across arms, so the per-seed difference
to a reference arm removes what the seed alone changes; the mean difference gets a Student t
confidence interval over the seeds both arms ran, and a verdict says whether it excludes 0.
"""
import math
import statistics

CONFIDENCE = 0.95
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
ONE_SEED, NO_PAIRS = "one seed: no interval", "no paired seeds"


def is_number(value):
    """Not missing (None) and not NaN (COCO's AP of an area range without objects)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def two_sided_t_probability(t, df):
    """P(|T| <= t) for Student's t with a positive integer ``df``.

    For integer degrees of freedom the t distribution has a finite series in
    theta = atan(t / sqrt(df)) (no special functions needed, so no scipy): for even ``df``
    sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2)), for odd ``df``
    2/pi * (theta + sin(theta) c (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3))), with
    c = cos(theta); for df = 1 (Cauchy) the series is empty.
    """
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    term = series = 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        return math.sin(theta) * series
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        series += term
    odd_part = math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0
    return 2 / math.pi * (theta + odd_part)


def t_critical(df, confidence=CONFIDENCE):
    """The t with P(|T| <= t) = ``confidence`` for Student's t with ``df`` degrees of freedom:
    the half-width of a ``confidence`` interval in standard errors (4.303 for df = 2 at 95%).

    Found by bisection on ``two_sided_t_probability``, which increases with t; 100 halvings
    narrow the bracket below floating-point resolution.
    """
    low, high = 0.0, 1.0
    while two_sided_t_probability(high, df) < confidence:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if two_sided_t_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def verdict(ci_low, ci_high, higher_is_better=True):
    """Whether a difference is real: "better" or "worse" when its interval excludes 0, in the
    sense of the metric (where lower is better, a negative difference is "better")."""
    if ci_low > 0 or ci_high < 0:
        return BETTER if (ci_low > 0) == higher_is_better else WORSE
    return NO_DIFFERENCE


def paired_difference(values, reference_values, higher_is_better=True, confidence=CONFIDENCE):
    """Per-seed differences ``values[seed] - reference_values[seed]`` (both {seed: value}) over
    the seeds both have a value for, their mean, a Student t interval and a verdict.

    The interval is mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n), sd the sample standard
    deviation of the differences; with one seed there is no interval, with none no mean.
    """
    seeds = sorted(s for s in values if s in reference_values
                   and is_number(values[s]) and is_number(reference_values[s]))
    differences = [values[s] - reference_values[s] for s in seeds]
    n = len(differences)
    out = {"seeds": seeds, "differences": {str(s): d for s, d in zip(seeds, differences)}, "n": n,
           "mean": statistics.fmean(differences) if n else None, "ci_low": None, "ci_high": None,
           "df": None, "t": None, "interval": None, "verdict": ONE_SEED if n == 1 else NO_PAIRS}
    if n < 2:
        return out
    t = t_critical(n - 1, confidence)
    half_width = t * statistics.stdev(differences) / math.sqrt(n)
    out.update(ci_low=out["mean"] - half_width, ci_high=out["mean"] + half_width, df=n - 1, t=t,
               interval=f"{confidence:.0%} Student t, {n - 1} df",
               verdict=verdict(out["mean"] - half_width, out["mean"] + half_width, higher_is_better))
    return out
