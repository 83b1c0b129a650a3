//! The statistics of reports: the standard normal distribution, the
//! two-proportion z-test for conversion rates, and Welch's large-sample
//! z-test for revenue per exposed client. All are normal approximations,
//! valid only with enough data, which is why reports say "not enough data"
//! below a documented minimum.

use serde::Serialize;

/// The 97.5th percentile of the standard normal: a 95 % interval is ±1.96 SE.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// The complementary error function, by the Chebyshev fit of Numerical
/// Recipes (`erfcc`): relative error under 1.2e-7 everywhere, more than
/// a report's p-values and intervals need.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal distribution function Φ.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The two-sided p-value of a z statistic.
pub fn two_sided_p(z: f64) -> f64 {
    (2.0 * (1.0 - normal_cdf(z.abs()))).clamp(0.0, 1.0)
}

/// A difference between a variant and its baseline, with 95 % intervals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Variant minus baseline.
    pub absolute: f64,
    pub absolute_ci: [f64; 2],
    /// Variant over baseline, minus 1 (`None` when the baseline is 0).
    pub relative: Option<f64>,
    pub relative_ci: Option<[f64; 2]>,
    pub p_value: f64,
    /// The test the p-value comes from.
    pub test: &'static str,
}

/// Conversion of `x1` of `n1` against `x0` of `n0`: the pooled
/// two-proportion z-test for the p-value, the unpooled (Wald) interval for
/// the difference, and the log-ratio (Katz) interval for the relative lift.
pub fn two_proportions(x1: u64, n1: u64, x0: u64, n0: u64) -> Option<Comparison> {
    if n1 == 0 || n0 == 0 {
        return None;
    }
    let (n1f, n0f) = (n1 as f64, n0 as f64);
    let (p1, p0) = (x1 as f64 / n1f, x0 as f64 / n0f);
    let d = p1 - p0;
    let se = (p1 * (1.0 - p1) / n1f + p0 * (1.0 - p0) / n0f).sqrt();
    let pooled = (x1 + x0) as f64 / (n1f + n0f);
    let se0 = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n0f)).sqrt();
    let p_value = if se0 > 0.0 { two_sided_p(d / se0) } else { 1.0 };
    let (relative, relative_ci) = if x1 > 0 && x0 > 0 {
        let ratio = p1 / p0;
        let se_log = ((1.0 - p1) / x1 as f64 + (1.0 - p0) / x0 as f64).sqrt();
        let lo = (ratio.ln() - Z_95 * se_log).exp() - 1.0;
        let hi = (ratio.ln() + Z_95 * se_log).exp() - 1.0;
        (Some(ratio - 1.0), Some([lo, hi]))
    } else if x0 > 0 {
        (Some(p1 / p0 - 1.0), None)
    } else {
        (None, None)
    };
    Some(Comparison {
        absolute: d,
        absolute_ci: [d - Z_95 * se, d + Z_95 * se],
        relative,
        relative_ci,
        p_value,
        test: "two-proportion z-test (pooled)",
    })
}

/// A sample summarised by its size, sum and sum of squares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Moments {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// The sample variance (n - 1 in the denominator).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
    }
}

/// Mean of `a` against mean of `b` (revenue per exposed client): Welch's
/// unequal-variance statistic read against the normal distribution (the
/// samples reports compare are hundreds or more, where Welch's t and z
/// agree to the third digit); the relative difference's interval by the
/// delta method.
pub fn welch(a: &Moments, b: &Moments) -> Option<Comparison> {
    if a.n < 2 || b.n < 2 {
        return None;
    }
    let (ma, mb) = (a.mean(), b.mean());
    let (va, vb) = (a.variance() / a.n as f64, b.variance() / b.n as f64);
    let d = ma - mb;
    let se = (va + vb).sqrt();
    let p_value = if se > 0.0 {
        two_sided_p(d / se)
    } else if d == 0.0 {
        1.0
    } else {
        0.0
    };
    let (relative, relative_ci) = if mb != 0.0 {
        let r = ma / mb;
        let se_r = (va / (mb * mb) + ma * ma * vb / mb.powi(4)).sqrt();
        (
            Some(r - 1.0),
            Some([r - 1.0 - Z_95 * se_r, r - 1.0 + Z_95 * se_r]),
        )
    } else {
        (None, None)
    };
    Some(Comparison {
        absolute: d,
        absolute_ci: [d - Z_95 * se, d + Z_95 * se],
        relative,
        relative_ci,
        p_value,
        test: "Welch's z-test (unequal variances, large samples)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn the_normal_distribution_matches_published_tables() {
        // Abramowitz & Stegun, table 26.1; NIST/SEMATECH e-Handbook 1.3.6.7.1.
        close(normal_cdf(0.0), 0.5, 1e-7);
        close(normal_cdf(1.0), 0.841_344_746, 1e-7);
        close(normal_cdf(1.644_853_627), 0.95, 1e-7);
        close(normal_cdf(Z_95), 0.975, 1e-7);
        close(normal_cdf(2.575_829_304), 0.995, 1e-7);
        close(normal_cdf(-3.0), 0.001_349_898, 1e-8);
        close(normal_cdf(-1.5), 0.066_807_201, 1e-7);
        close(erfc(0.5), 0.479_500_122, 1e-7);
        close(erfc(2.0), 0.004_677_735, 1e-8);
        close(two_sided_p(Z_95), 0.05, 1e-7);
    }

    #[test]
    fn two_proportions_match_an_independent_computation() {
        // 52 of 100 against 39 of 95. Reference values from Python's
        // math.erfc (accurate to machine precision): z = 1.5316216,
        // p = 0.1256158; Wald se 0.0710163; Katz interval of the relative
        // lift [-0.0670700, 0.7197909].
        let c = two_proportions(52, 100, 39, 95).unwrap();
        close(c.absolute, 0.52 - 39.0 / 95.0, 1e-12);
        close(c.p_value, 0.125_615_844, 1e-6);
        close(c.absolute_ci[0], -0.029_715_640, 1e-9);
        let rel = c.relative_ci.unwrap();
        close(rel[0], -0.067_070_034, 1e-9);
        close(rel[1], 0.719_790_878, 1e-9);
        // No difference: p = 1, interval around 0.
        let same = two_proportions(10, 100, 10, 100).unwrap();
        close(same.p_value, 1.0, 1e-6);
        close(same.absolute_ci[0], -same.absolute_ci[1], 1e-12);
        assert!(two_proportions(1, 0, 1, 1).is_none());
    }

    #[test]
    fn welch_matches_a_direct_computation() {
        let mut a = Moments::default();
        let mut b = Moments::default();
        for x in [10.0, 12.0, 9.0, 11.0, 13.0] {
            a.add(x);
        }
        for x in [8.0, 9.0, 7.0, 10.0, 6.0, 8.0] {
            b.add(x);
        }
        close(a.variance(), 2.5, 1e-12);
        close(b.variance(), 2.0, 1e-12);
        let c = welch(&a, &b).unwrap();
        close(c.absolute, 11.0 - 8.0, 1e-12);
        let se = (2.5_f64 / 5.0 + 2.0 / 6.0).sqrt();
        close(c.p_value, two_sided_p(3.0 / se), 1e-12);
        close(c.relative.unwrap(), 11.0 / 8.0 - 1.0, 1e-12);
    }
}
