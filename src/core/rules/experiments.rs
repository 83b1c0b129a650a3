//! `variant(experiment, weights)`: the client's variant in an experiment,
//! given on first use from a hash of the experiment and the client id and
//! kept from then on (see [`crate::domain::experiments`]).

use super::api::with_ctx;
use super::limits::check_name;
use crate::domain::experiments::{MAX_EXPERIMENTS, bucket, choose};
use rhai::{Engine, EvalAltResult, Map as RhaiMap};

/// Variants an experiment may have at most.
pub const MAX_VARIANTS: usize = 16;

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("variant", variant);
}

fn refuse<T>(message: String) -> Result<T, Box<EvalAltResult>> {
    Err(message.into())
}

/// The weights as given, in the map's (name) order, checked.
fn weights(experiment: &str, map: RhaiMap) -> Result<Vec<(String, f64)>, Box<EvalAltResult>> {
    if map.is_empty() || map.len() > MAX_VARIANTS {
        return refuse(format!(
            "variant(\"{experiment}\"): give 1 to {MAX_VARIANTS} variants with their weights, \
             like #{{A: 50, B: 50}}"
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, w) in map {
        let w = if let Ok(i) = w.as_int() {
            i as f64
        } else if let Ok(f) = w.as_float() {
            f
        } else {
            return refuse(format!(
                "variant(\"{experiment}\"): the weight of `{name}` must be a number, got {}",
                w.type_name()
            ));
        };
        if !(w.is_finite() && w >= 0.0) {
            return refuse(format!(
                "variant(\"{experiment}\"): the weight of `{name}` must be 0 or more, got {w}"
            ));
        }
        check_name("a variant name", &name)?;
        out.push((name.to_string(), w));
    }
    Ok(out)
}

/// The client's variant: the one given before, whatever the weights say
/// now; else chosen by the client's bucket and recorded as an exposure.
fn variant(experiment: &str, map: RhaiMap) -> Result<String, Box<EvalAltResult>> {
    check_name("an experiment name", experiment)?;
    let weights = weights(experiment, map)?;
    with_ctx(|ctx| {
        let given = ctx.variants.get(experiment).cloned();
        let variant = match given {
            Some(v) => v,
            None => {
                if ctx.variants.len() >= MAX_EXPERIMENTS {
                    return refuse(format!(
                        "variant(\"{experiment}\"): the client is in {MAX_EXPERIMENTS} \
                         experiments already, the most kept"
                    ));
                }
                let u = bucket(experiment, &ctx.client_id);
                let Some(v) = choose(&weights, u) else {
                    return refuse(format!(
                        "variant(\"{experiment}\"): no variant has a weight above 0"
                    ));
                };
                let v = v.to_string();
                ctx.variants.insert(experiment.to_string(), v.clone());
                v
            }
        };
        if !ctx.exposed.iter().any(|(e, _)| e == experiment) {
            ctx.exposed.push((experiment.to_string(), variant.clone()));
        }
        Ok(variant)
    })?
}
