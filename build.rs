// `sqlx::migrate!` embeds the migrations when the crate compiles; without
// this, a new or changed migration alone would not rebuild the binary.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
