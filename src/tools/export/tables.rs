//! What an export writes, table by table: each table is a query and a
//! column schema. The event log gives three tables in one pass (`events`,
//! `orders`, `order_items`), exported incrementally by stream sequence; the
//! others are the current state, copied whole at every run
//! ([`SNAPSHOT_TABLES`]). A new table (experiments, boards) is one more
//! [`SnapshotTable`] in that list: its query, what the query selects, its
//! columns, and how a selected row becomes one of its rows.

use super::writer::{Column, col};
use crate::domain::history::ClientState;
use crate::store::ColType::{Bool, Float, Int, Json, Text, Time};
use crate::store::{Cell, ColType, Sql, state_from_row};
use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

/// The event log's columns as [`EVENTS_SQL`] selects them.
pub const EVENTS_READ: &[ColType] = &[Int, Text, Text, Text, Time, Time, Json, Json];

/// The shop's events (those with a stream sequence) in `($1, $2]`, in event
/// time order, so that each day's partition is written in one go.
pub const EVENTS_SQL: Sql = Sql::same(
    "SELECT stream_seq, id, type, client_id, occurred_at, received_at, CAST(data AS TEXT), \
     CAST(context AS TEXT) FROM events WHERE stream_seq > $1 AND stream_seq <= $2 \
     ORDER BY occurred_at, stream_seq, id",
);

/// The tables written from the event log, by stream sequence.
pub const INCREMENTAL_TABLES: [&str; 3] = ["events", "orders", "order_items"];

/// When an event happened, in the business timezone: year, month, day,
/// weekday (ISO: 1 = Monday ... 7 = Sunday), hour.
const LOCAL_PARTS: [Column; 5] = [
    col("year", Int),
    col("month", Int),
    col("day", Int),
    col("weekday", Int),
    col("hour", Int),
];

pub const EVENTS: &[Column] = &[
    col("stream_seq", Int),
    col("id", Text),
    col("type", Text),
    col("client_id", Text),
    col("occurred_at", Time),
    col("received_at", Time),
    LOCAL_PARTS[0],
    LOCAL_PARTS[1],
    LOCAL_PARTS[2],
    LOCAL_PARTS[3],
    LOCAL_PARTS[4],
    col("session_id", Text),
    col("channel", Text),
    col("context_channel", Text),
    col("total", Float),
    col("currency", Text),
    col("order_id", Text),
    col("product_id", Text),
    col("category", Text),
    col("price", Float),
    col("quantity", Float),
    col("partner_track_id", Text),
    col("partner_id", Text),
    col("promo_code", Text),
    col("acquisition_channel", Text),
    col("page", Text),
    col("utm_source", Text),
    col("utm_medium", Text),
    col("utm_campaign", Text),
    col("message_id", Text),
    col("data", Json),
    col("context", Json),
];

pub const ORDERS: &[Column] = &[
    col("order_id", Text),
    col("event_id", Text),
    col("stream_seq", Int),
    col("client_id", Text),
    col("occurred_at", Time),
    LOCAL_PARTS[0],
    LOCAL_PARTS[1],
    LOCAL_PARTS[2],
    LOCAL_PARTS[3],
    LOCAL_PARTS[4],
    col("channel", Text),
    col("context_channel", Text),
    col("session_id", Text),
    col("total", Float),
    col("currency", Text),
    col("items", Int),
    col("quantity", Float),
    col("store_id", Text),
    col("partner_track_id", Text),
    col("promo_code", Text),
    col("consultant", Text),
    col("team", Text),
];

pub const ORDER_ITEMS: &[Column] = &[
    col("order_id", Text),
    col("event_id", Text),
    col("stream_seq", Int),
    col("client_id", Text),
    col("occurred_at", Time),
    col("line", Int),
    col("product_id", Text),
    col("name", Text),
    col("category", Text),
    col("quantity", Float),
    col("price", Float),
    col("amount", Float),
];

/// The rows one stored event gives.
pub struct EventRows {
    pub client_id: String,
    pub event: Vec<Cell>,
    pub order: Option<Vec<Cell>>,
    pub items: Vec<Vec<Cell>>,
}

/// Turns a row of [`EVENTS_SQL`] into the rows of `events`, and for an
/// `order_placed`, of `orders` and `order_items`.
pub fn event_rows(raw: Vec<Cell>, tz: Tz) -> anyhow::Result<EventRows> {
    let [seq, id, ty, client, occurred, received, data, context]: [Cell; 8] = raw
        .try_into()
        .map_err(|_| anyhow::anyhow!("an event row of the wrong width"))?;
    let Cell::Time(at) = occurred else {
        bail!("an event without occurred_at: {id:?}");
    };
    let (Cell::Text(client_id), Cell::Text(event_type)) = (&client, &ty) else {
        bail!("an event without client or type: {id:?}");
    };
    let data = json_object(&data).context("event data")?;
    let context = json_object(&context).context("event context")?;
    let parts = local_parts(at, tz);
    let d = |k: &str| text(data.get(k));
    let c = |k: &str| text(context.get(k));
    let either = |k: &str| text(data.get(k).or_else(|| context.get(k)));
    let session = text(context.get("session_id").or_else(|| data.get("session_id")));
    let mut event = vec![seq.clone(), id.clone(), ty.clone(), client.clone()];
    event.extend([Cell::Time(at), received]);
    event.extend(parts.iter().cloned());
    event.extend([
        session.clone(),
        d("channel"),
        c("channel"),
        number(data.get("total")),
        d("currency"),
        d("order_id"),
        d("product_id"),
        d("category"),
        number(data.get("price")),
        number(data.get("quantity")),
        either("partner_track_id"),
        d("partner_id"),
        d("promo_code"),
        d("acquisition_channel"),
        text(context.get("page").or_else(|| data.get("url"))),
        c("utm_source"),
        c("utm_medium"),
        c("utm_campaign"),
        d("message_id"),
        json_text(&data),
        json_text(&context),
    ]);
    let (mut order, mut items) = (None, Vec::new());
    if event_type == "order_placed" {
        let lines = data.get("items").and_then(Value::as_array);
        let order_id = d("order_id");
        let mut quantity = 0.0;
        for (i, item) in lines.into_iter().flatten().enumerate() {
            let q = number(item.get("quantity"));
            let price = number(item.get("price"));
            let amount = match (&q, &price) {
                (Cell::Float(q), Cell::Float(p)) => Cell::Float(q * p),
                _ => Cell::Null,
            };
            if let Cell::Float(q) = q {
                quantity += q;
            }
            items.push(vec![
                order_id.clone(),
                id.clone(),
                seq.clone(),
                client.clone(),
                Cell::Time(at),
                Cell::Int(i as i64 + 1),
                text(item.get("product_id")),
                text(item.get("name")),
                text(item.get("category")),
                q,
                price,
                amount,
            ]);
        }
        let mut row = vec![order_id, id, seq, client.clone(), Cell::Time(at)];
        row.extend(parts);
        row.extend([
            d("channel"),
            c("channel"),
            session,
            number(data.get("total")),
            d("currency"),
            Cell::Int(lines.map_or(0, Vec::len) as i64),
            Cell::Float(quantity),
            d("store_id"),
            either("partner_track_id"),
            d("promo_code"),
            d("consultant"),
            d("team"),
        ]);
        order = Some(row);
    }
    Ok(EventRows {
        client_id: client_id.clone(),
        event,
        order,
        items,
    })
}

fn local_parts(t: DateTime<Utc>, tz: Tz) -> [Cell; 5] {
    let l = t.with_timezone(&tz);
    [
        Cell::Int(i64::from(l.year())),
        Cell::Int(i64::from(l.month())),
        Cell::Int(i64::from(l.day())),
        Cell::Int(i64::from(l.weekday().number_from_monday())),
        Cell::Int(i64::from(l.hour())),
    ]
}

fn json_object(cell: &Cell) -> anyhow::Result<Map<String, Value>> {
    match cell {
        Cell::Text(s) => Ok(serde_json::from_str(s)?),
        _ => Ok(Map::new()),
    }
}

fn json_text(map: &Map<String, Value>) -> Cell {
    Cell::Text(serde_json::to_string(map).expect("JSON values serialise"))
}

/// A text field: a string as it is, a number or a boolean as written; other
/// values (objects, lists, null) are left to the JSON column.
fn text(v: Option<&Value>) -> Cell {
    match v {
        Some(Value::String(s)) => Cell::Text(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Cell::Text(v.to_string()),
        _ => Cell::Null,
    }
}

/// A number field: a JSON number, or a string that reads as a finite one.
fn number(v: Option<&Value>) -> Cell {
    let n = match v {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    n.filter(|n| n.is_finite()).map_or(Cell::Null, Cell::Float)
}

/// A table copied whole at every run: the current state of something.
pub struct SnapshotTable {
    pub name: &'static str,
    pub sql: Sql,
    /// What the query selects, column by column.
    pub reads: &'static [ColType],
    pub columns: &'static [Column],
    /// The column (of `columns`) whose day partitions the table; the query
    /// must return rows in its order.
    pub partition_by: Option<usize>,
    /// The column (of the query) with the client's id: rows of erased
    /// clients are left out.
    pub client_col: Option<usize>,
    /// A selected row as the table's row.
    pub shape: fn(Vec<Cell>) -> anyhow::Result<Vec<Cell>>,
}

/// Every snapshot table, in the order a run writes them. Later issues'
/// tables (experiments, exposures, boards) go here.
pub const SNAPSHOT_TABLES: &[SnapshotTable] = &[CLIENTS, MAILS, TASKS, COUNTERS, EXPOSURES];

fn as_is(row: Vec<Cell>) -> anyhow::Result<Vec<Cell>> {
    Ok(row)
}

const CLIENTS: SnapshotTable = SnapshotTable {
    name: "clients",
    sql: Sql::same("SELECT client_id, CAST(state AS TEXT) FROM clients ORDER BY client_id"),
    reads: &[Text, Json],
    columns: &[
        col("client_id", Text),
        col("email", Text),
        col("first_name", Text),
        col("last_name", Text),
        col("acquisition_channel", Text),
        col("promo_code", Text),
        col("partner_id", Text),
        col("locale", Text),
        col("timezone", Text),
        col("marketing_consent", Bool),
        col("unsubscribed", Bool),
        col("registered_at", Time),
        col("first_seen", Time),
        col("last_seen", Time),
        col("events", Int),
        col("orders", Int),
        col("orders_cancelled", Int),
        col("spend", Float),
        col("cart_adds", Int),
        col("mails", Int),
        col("opens", Int),
        col("clicks", Int),
        col("events_by_type", Json),
        col("orders_by_channel", Json),
    ],
    partition_by: None,
    client_col: Some(0),
    shape: client_row,
};

fn client_row(row: Vec<Cell>) -> anyhow::Result<Vec<Cell>> {
    let (Some(Cell::Text(id)), Some(Cell::Text(state))) = (row.first(), row.get(1)) else {
        bail!("a client row without id or state");
    };
    let s: ClientState = state_from_row(id, 0, state)?;
    let p = &s.profile;
    let opt = |v: &Option<String>| v.clone().map_or(Cell::Null, Cell::Text);
    let time = |t: Option<DateTime<Utc>>| t.map_or(Cell::Null, Cell::Time);
    let count = |n: u64| Cell::Int(i64::try_from(n).unwrap_or(i64::MAX));
    Ok(vec![
        Cell::Text(id.clone()),
        opt(&p.email),
        opt(&p.first_name),
        opt(&p.last_name),
        opt(&p.acquisition_channel),
        opt(&p.promo_code),
        opt(&p.partner_id),
        opt(&p.locale),
        opt(&p.timezone),
        Cell::Bool(p.marketing_consent),
        Cell::Bool(p.unsubscribed),
        time(p.registered_at),
        time(p.first_seen),
        time(p.last_seen),
        count(s.stats.events.values().sum()),
        count(s.stats.orders),
        count(s.stats.orders_cancelled),
        Cell::Float(s.stats.spend),
        count(s.stats.cart_adds),
        count(s.stats.mails),
        count(s.stats.opens),
        count(s.stats.clicks),
        Cell::Text(serde_json::to_string(&s.stats.events)?),
        Cell::Text(serde_json::to_string(&s.stats.orders_by_channel)?),
    ])
}

/// A mail's first open, first click (events naming its Message-ID, whose
/// effect key comes before `.nudge@`), and, from the exposures of its rule
/// (see "Knowing what works"), the client's conversion toward the rule's
/// goal and their variant in its experiment.
macro_rules! mails_sql {
    ($template:literal, $names:literal) => {
        concat!(
            "SELECT o.key, o.rule, ",
            $template,
            ", o.client_id, o.status, o.attempts, \
             o.created_at, o.sent_at, o.message_id, \
             (SELECT MIN(e.occurred_at) FROM events e WHERE e.client_id = o.client_id \
              AND e.type = 'email_opened' AND ",
            $names,
            " > 0), \
             (SELECT MIN(e.occurred_at) FROM events e WHERE e.client_id = o.client_id \
              AND e.type = 'email_clicked' AND ",
            $names,
            " > 0), \
             (SELECT MIN(x.converted_at) FROM exposures x WHERE x.rule = o.rule \
              AND x.client_id = o.client_id), \
             (SELECT MIN(CASE WHEN x.held_out THEN 'global_control' ELSE x.variant END) \
              FROM exposures x WHERE x.rule = o.rule AND x.client_id = o.client_id \
              AND x.experiment <> '') \
             FROM outbox o WHERE o.kind = 'mail' ORDER BY o.created_at, o.key"
        )
    };
}

const MAILS: SnapshotTable = SnapshotTable {
    name: "mails",
    sql: Sql {
        sqlite: mails_sql!(
            "json_extract(o.payload, '$.template')",
            "instr(json_extract(e.data, '$.message_id'), o.key || '.nudge@')"
        ),
        postgres: mails_sql!(
            "o.payload->>'template'",
            "strpos(e.data->>'message_id', o.key || '.nudge@')"
        ),
    },
    reads: &[
        Text, Text, Text, Text, Text, Int, Time, Time, Text, Time, Time, Time, Text,
    ],
    columns: &[
        col("key", Text),
        col("rule", Text),
        col("template", Text),
        col("client_id", Text),
        col("status", Text),
        col("attempts", Int),
        col("created_at", Time),
        col("sent_at", Time),
        col("message_id", Text),
        col("opened_at", Time),
        col("clicked_at", Time),
        col("converted_at", Time),
        col("opened", Bool),
        col("clicked", Bool),
        col("converted", Bool),
        col("variant", Text),
    ],
    partition_by: Some(6),
    client_col: Some(3),
    shape: mail_row,
};

fn mail_row(mut row: Vec<Cell>) -> anyhow::Result<Vec<Cell>> {
    let variant = row.pop().unwrap_or(Cell::Null);
    let flags: Vec<Cell> = row[9..12]
        .iter()
        .map(|c| Cell::Bool(!matches!(c, Cell::Null)))
        .collect();
    row.extend(flags);
    row.push(variant);
    Ok(row)
}

/// Who was exposed to which rule and experiment, and what followed: the
/// rows behind `nudge report`, for analyses of one's own.
const EXPOSURES: SnapshotTable = SnapshotTable {
    name: "exposures",
    sql: Sql::same(
        "SELECT client_id, rule, experiment, variant, held_out, exposed_at, \
         CAST(goal AS TEXT), CAST(mails AS BIGINT), opened, clicked, converted_at, revenue, \
         conversion_event \
         FROM exposures ORDER BY exposed_at, rule, experiment, client_id",
    ),
    reads: &[
        Text, Text, Text, Text, Bool, Time, Json, Int, Bool, Bool, Time, Float, Text,
    ],
    columns: &[
        col("client_id", Text),
        col("rule", Text),
        col("experiment", Text),
        col("variant", Text),
        col("held_out", Bool),
        col("exposed_at", Time),
        col("goal", Json),
        col("mails", Int),
        col("opened", Bool),
        col("clicked", Bool),
        col("converted_at", Time),
        col("revenue", Float),
        col("conversion_event", Text),
    ],
    partition_by: Some(5),
    client_col: Some(0),
    shape: as_is,
};

const TASKS: SnapshotTable = SnapshotTable {
    name: "tasks",
    sql: Sql::same(
        "SELECT id, team, title, client_id, rule, cause, CAST(data AS TEXT), status, at, \
         created_at, done_at FROM tasks ORDER BY created_at, id",
    ),
    reads: &[
        Text, Text, Text, Text, Text, Text, Json, Text, Time, Time, Time,
    ],
    columns: &[
        col("id", Text),
        col("team", Text),
        col("title", Text),
        col("client_id", Text),
        col("rule", Text),
        col("cause", Text),
        col("data", Json),
        col("status", Text),
        col("at", Time),
        col("created_at", Time),
        col("done_at", Time),
    ],
    partition_by: Some(9),
    client_col: Some(3),
    shape: as_is,
};

const COUNTERS: SnapshotTable = SnapshotTable {
    name: "counters",
    sql: Sql::same("SELECT name, period, value FROM counters ORDER BY name, period"),
    reads: &[Text, Text, Float],
    columns: &[col("name", Text), col("period", Text), col("value", Float)],
    partition_by: None,
    client_col: None,
    shape: as_is,
};
