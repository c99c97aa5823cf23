//! `athena-ddl`: the CREATE EXTERNAL TABLE statement of `ops/athena/create_table.sql` for the
//! configured bucket and prefix.

const TEMPLATE: &str = include_str!("../../ops/athena/create_table.sql");

pub fn ddl(database: &str, table: &str, bucket: &str, prefix: &str, projection_start_year: i32) -> String {
    let location = format!("s3://{bucket}/{}/", prefix.trim_matches('/'));
    TEMPLATE
        .replace("{{database}}", database)
        .replace("{{table}}", table)
        .replace("{{location}}", &location)
        .replace("{{projection_start_year}}", &projection_start_year.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_all_filled() {
        let sql = super::ddl("audit", "decisions", "bkt", "trail", 2024);
        assert!(!sql.contains("{{"), "{sql}");
        assert!(sql.contains("s3://bkt/trail/"));
    }
}
