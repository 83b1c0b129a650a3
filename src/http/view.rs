//! The 360 view of a client for staff: the history nudge keeps, shaped for
//! people who have the client on the phone.

use crate::domain::history::ClientState;
use crate::store::{MailRow, TaskRow};
use serde_json::{Map, Value, json};

/// Which event types count as which activity in `last_activity`.
const ACTIVITY: &[(&str, &str)] = &[
    ("order", "order_placed"),
    ("login", "login_succeeded"),
    ("page_view", "page_viewed"),
    ("product_view", "product_viewed"),
    ("cart_add", "cart_item_added"),
    ("email_opened", "email_opened"),
    ("email_clicked", "email_clicked"),
    ("support_contact", "support_contacted"),
    ("error", "error_occurred"),
];

/// What the 360 view shows of a client's mails besides their rows: the
/// templates to render them with, and the mails opened and clicked (by the
/// effect key inside their Message-ID).
pub struct MailContext<'a> {
    pub templates: &'a crate::core::templates::TemplateSet,
    pub opened: &'a std::collections::BTreeSet<String>,
    pub clicked: &'a std::collections::BTreeSet<String>,
}

pub fn client_360(
    c: &ClientState,
    mails: &[MailRow],
    tasks: &[TaskRow],
    ctx: &MailContext<'_>,
) -> Value {
    let p = &c.profile;
    let st = &c.stats;
    let mut orders = Map::new();
    for channel in ["online", "instore"] {
        let o = st
            .orders_by_channel
            .get(channel)
            .cloned()
            .unwrap_or_default();
        let per_order = if o.count > 0 {
            o.items as f64 / o.count as f64
        } else {
            0.0
        };
        orders.insert(
            channel.into(),
            json!({"count": o.count, "items": o.items, "items_per_order": per_order, "total": o.total}),
        );
    }
    for (channel, o) in &st.orders_by_channel {
        if !orders.contains_key(channel) {
            let per_order = if o.count > 0 {
                o.items as f64 / o.count as f64
            } else {
                0.0
            };
            orders.insert(
                channel.clone(),
                json!({"count": o.count, "items": o.items, "items_per_order": per_order, "total": o.total}),
            );
        }
    }
    let mut top: Vec<(&String, &crate::domain::history::Purchase)> = st.purchases.iter().collect();
    top.sort_by(|a, b| b.1.quantity.cmp(&a.1.quantity).then(a.0.cmp(b.0)));
    let top_products: Vec<Value> = top
        .into_iter()
        .take(5)
        .map(|(id, p)| json!({"product_id": id, "name": p.name, "purchases": p.quantity}))
        .collect();
    let mut last_activity = Map::new();
    for (name, ty) in ACTIVITY {
        last_activity.insert((*name).into(), json!(st.last_at.get(*ty)));
    }
    let email_sent = mails
        .iter()
        .filter(|m| m.kind == "mail" && m.status == "sent")
        .filter_map(|m| m.sent_at)
        .max();
    last_activity.insert("email_sent".into(), json!(email_sent));
    let recent_errors: Vec<Value> = st
        .recent_errors
        .iter()
        .rev()
        .map(|e| json!({"page": e.page, "message": e.message, "code": e.code, "at": e.at}))
        .collect();
    let mails: Vec<Value> = mails
        .iter()
        .filter(|m| m.kind == "mail")
        .map(|m| {
            let key = m
                .message_id
                .as_deref()
                .and_then(crate::domain::effects::key_of_message_id)
                .map(str::to_string);
            let seen = |set: &std::collections::BTreeSet<String>| {
                key.as_ref().is_some_and(|k| set.contains(k))
            };
            let content = m
                .template
                .as_deref()
                .and_then(|t| mail_content(ctx.templates, t, &m.vars, p.locale.as_deref()));
            // What the mail's rule exposed the client to, and whether they
            // converted since (the report's view of this one client).
            let exposure = c.exposures.rows.iter().find(|e| e.rule == m.rule);
            json!({"rule": m.rule, "template": m.template, "status": m.status, "at": m.at,
                   "variant": exposure.map(|e| e.group()).filter(|g| !g.is_empty()),
                   "converted": exposure.and_then(|e| e.converted.as_ref()).map(|v| json!({"at": v.at, "revenue": v.revenue})),
                   "sent_at": m.sent_at, "error": m.last_error, "message_id": m.message_id,
                   "opened": seen(ctx.opened), "clicked": seen(ctx.clicked),
                   "subject": content.as_ref().map(|c| c.subject.clone()),
                   "text": content.as_ref().map(|c| c.text.clone()),
                   "html": content.as_ref().map(|c| c.html.clone())})
        })
        .collect();
    let mut sessions: Vec<Value> = c.sessions.current.iter().map(session).collect();
    sessions.extend(c.sessions.recent.iter().map(session));
    let experiments: Vec<Value> = c
        .exposures
        .rows
        .iter()
        .map(|e| {
            json!({"rule": e.rule, "experiment": e.experiment, "variant": e.variant,
                   "group": e.group(), "exposed_at": e.at, "mails": e.mails,
                   "opened": e.opened, "clicked": e.clicked,
                   "goal": e.goal, "converted": e.converted})
        })
        .collect();
    json!({
        "experiments": experiments,
        "client_id": c.client_id,
        "email": p.email,
        "first_name": p.first_name,
        "last_name": p.last_name,
        "acquisition_channel": p.acquisition_channel,
        "locale": p.locale,
        "timezone": p.timezone,
        "registered_at": p.registered_at,
        "first_seen": p.first_seen,
        "last_seen": p.last_seen,
        "marketing_consent": p.marketing_consent,
        "unsubscribed": p.unsubscribed,
        "orders": orders,
        "total_spent": st.spend,
        "top_products": top_products,
        "last_activity": last_activity,
        "recent_errors": recent_errors,
        "mails": mails,
        "tasks": tasks,
        "sessions": sessions,
    })
}

fn session(s: &crate::domain::history::Session) -> Value {
    json!({
        "id": s.id, "start": s.start, "end": s.end, "duration_secs": (s.end - s.start).num_seconds(),
        "channel": s.channel, "page_views": s.page_views, "product_views": s.product_views,
        "cart_adds": s.cart_adds, "orders": s.orders, "ended": s.ended,
    })
}

/// A mail as the client got it, rendered again with the templates in force
/// (a template changed since shows its new wording); the unsubscribe link
/// is left out, it is the client's own.
fn mail_content(
    templates: &crate::core::templates::TemplateSet,
    template: &str,
    vars: &Value,
    locale: Option<&str>,
) -> Option<crate::core::templates::Rendered> {
    let mut vars = vars.as_object().cloned().unwrap_or_default();
    vars.insert("unsubscribe_url".into(), json!("#unsubscribe-link"));
    vars.insert("lang".into(), json!(crate::delivery::lang_tag(locale)));
    crate::delivery::render_mail(templates, template, vars).ok()
}
