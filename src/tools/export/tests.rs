//! The export's pieces without a database: the files read back with the
//! `parquet` crate's own reader, the CSV as text, the event rows.

use super::tables::{self, EVENTS, EVENTS_READ, ORDERS};
use super::writer::{Column, Format, TableWriter, col, local_date};
use crate::store::Cell;
use crate::store::ColType::{Bool, Float, Int, Text, Time};
use chrono::{DateTime, Utc};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::Field;
use serde_json::json;

const COLUMNS: &[Column] = &[
    col("n", Int),
    col("name", Text),
    col("amount", Float),
    col("ok", Bool),
    col("at", Time),
];

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn rows() -> Vec<Vec<Cell>> {
    vec![
        vec![
            Cell::Int(1),
            Cell::Text("a, \"quoted\"\nline".into()),
            Cell::Float(1.5),
            Cell::Bool(true),
            Cell::Time(at("2026-03-01T14:00:00.000123Z")),
        ],
        vec![
            Cell::Null,
            Cell::Null,
            Cell::Int(2),
            Cell::Null,
            Cell::Time(at("2026-03-01T14:59:00Z")),
        ],
        // 15:00 UTC is the next day in Tokyo.
        vec![
            Cell::Int(3),
            Cell::Text("c".into()),
            Cell::Null,
            Cell::Bool(false),
            Cell::Time(at("2026-03-01T15:00:00Z")),
        ],
    ]
}

fn write(dir: &std::path::Path, format: Format) -> Vec<super::FileInfo> {
    let mut w = TableWriter::new(
        dir,
        "t",
        "t",
        COLUMNS,
        format,
        "part-0-3",
        Some(4),
        chrono_tz::Asia::Tokyo,
    );
    for r in rows() {
        w.write(&r).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn parquet_files_hold_each_day_s_rows_with_their_types_and_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), Format::Parquet);
    let paths: Vec<(&str, u64)> = files.iter().map(|f| (f.path.as_str(), f.rows)).collect();
    assert_eq!(
        paths,
        [
            ("t/date=2026-03-01/part-0-3.parquet", 2),
            ("t/date=2026-03-02/part-0-3.parquet", 1)
        ]
    );
    let read = |rel: &str| -> Vec<Vec<Field>> {
        let file = std::fs::File::open(dir.path().join(rel)).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| {
                r.unwrap()
                    .get_column_iter()
                    .map(|(_, f)| f.clone())
                    .collect()
            })
            .collect()
    };
    let first = read(&files[0].path);
    assert_eq!(
        first[0],
        [
            Field::Long(1),
            Field::Str("a, \"quoted\"\nline".into()),
            Field::Double(1.5),
            Field::Bool(true),
            Field::TimestampMicros(at("2026-03-01T14:00:00.000123Z").timestamp_micros()),
        ]
    );
    assert_eq!(
        first[1][..4],
        [Field::Null, Field::Null, Field::Double(2.0), Field::Null]
    );
    assert_eq!(read(&files[1].path)[0][0], Field::Long(3));
    assert!(files.iter().all(|f| f.bytes > 0));
    // Nothing is left under a temporary name.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("t/date=2026-03-01"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["part-0-3.parquet"]);
}

#[test]
fn csv_files_are_rfc_4180_with_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), Format::Csv);
    let text = std::fs::read_to_string(dir.path().join(&files[0].path)).unwrap();
    assert_eq!(
        text,
        "n,name,amount,ok,at\r\n\
         1,\"a, \"\"quoted\"\"\nline\",1.5,true,2026-03-01T14:00:00.000123Z\r\n\
         ,,2,,2026-03-01T14:59:00.000000Z\r\n"
    );
}

#[test]
fn rows_out_of_day_order_are_refused_and_an_empty_table_gets_an_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = TableWriter::new(
        dir.path(),
        "t",
        "t",
        COLUMNS,
        Format::Parquet,
        "x",
        Some(4),
        chrono_tz::UTC,
    );
    let mut rows = rows();
    w.write(&rows.pop().unwrap()).unwrap();
    w.write(&rows.pop().unwrap()).unwrap();
    let mut late = rows.pop().unwrap();
    late[4] = Cell::Time(at("2026-02-01T00:00:00Z"));
    let e = w.write(&late).unwrap_err();
    assert!(e.to_string().contains("out of day order"), "{e}");

    let empty = TableWriter::new(
        dir.path(),
        "e",
        "e",
        COLUMNS,
        Format::Parquet,
        "x",
        Some(4),
        chrono_tz::UTC,
    );
    let files = empty.finish().unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(
        (files[0].path.as_str(), files[0].rows),
        ("e/date=__HIVE_DEFAULT_PARTITION__/x.parquet", 0)
    );
}

#[test]
fn an_order_gives_its_event_its_order_and_its_lines() {
    let data = json!({"order_id": "o1", "channel": "online", "total": "12.5", "currency": "EUR",
        "promo_code": "SPRING", "items": [
            {"product_id": 7, "name": "Tea", "quantity": 2, "price": 5},
            {"product_id": "p2", "quantity": 1, "price": 2.5}]});
    let context = json!({"session_id": "s1", "channel": "app", "partner_track_id": "acme"});
    let raw = vec![
        Cell::Int(42),
        Cell::Text("e1".into()),
        Cell::Text("order_placed".into()),
        Cell::Text("ana".into()),
        Cell::Time(at("2026-03-01T23:30:00Z")),
        Cell::Time(at("2026-03-01T23:30:01Z")),
        Cell::Text(data.to_string()),
        Cell::Text(context.to_string()),
    ];
    assert_eq!(raw.len(), EVENTS_READ.len());
    let r = tables::event_rows(raw, chrono_tz::Asia::Tokyo).unwrap();
    assert_eq!(r.event.len(), EVENTS.len());
    let field = |row: &[Cell], columns: &[Column], name: &str| {
        row[columns.iter().position(|c| c.name == name).unwrap()].clone()
    };
    let e = |name| field(&r.event, EVENTS, name);
    // Local time in Tokyo: Monday 2 March, 08:00.
    assert_eq!(
        [e("year"), e("month"), e("day"), e("weekday"), e("hour")],
        [
            Cell::Int(2026),
            Cell::Int(3),
            Cell::Int(2),
            Cell::Int(1),
            Cell::Int(8)
        ]
    );
    assert_eq!(e("total"), Cell::Float(12.5), "a number written as text");
    assert_eq!(e("channel"), Cell::Text("online".into()));
    assert_eq!(e("context_channel"), Cell::Text("app".into()));
    assert_eq!(e("session_id"), Cell::Text("s1".into()));
    assert_eq!(e("partner_track_id"), Cell::Text("acme".into()));
    assert_eq!(e("product_id"), Cell::Null);
    let order = r.order.expect("an order row");
    assert_eq!(order.len(), ORDERS.len());
    let o = |name| field(&order, ORDERS, name);
    assert_eq!(
        [o("items"), o("quantity"), o("promo_code")],
        [Cell::Int(2), Cell::Float(3.0), Cell::Text("SPRING".into())]
    );
    assert_eq!(r.items.len(), 2);
    assert_eq!(
        r.items[0][6],
        Cell::Text("7".into()),
        "a numeric product id as text"
    );
    assert_eq!(r.items[0][11], Cell::Float(10.0));
    assert_eq!(r.items[1][5], Cell::Int(2), "lines are numbered from 1");
    assert_eq!(
        local_date(at("2026-03-01T23:30:00Z"), chrono_tz::Asia::Tokyo),
        "2026-03-02"
    );
}
