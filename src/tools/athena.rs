//! `athena-ddl`: the CREATE EXTERNAL TABLE statement of `ops/athena/create_table.sql` for the
//! configured bucket and prefix.

const TEMPLATE: &str = include_str!("../../ops/athena/create_table.sql");

#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    #[error("--{flag} {value:?}: Athena names here must be [a-z0-9_]+")]
    Name { flag: &'static str, value: String },
    #[error("s3.prefix {0:?}: cannot contain quotes or backticks in a LOCATION")]
    Prefix(String),
}

pub fn ddl(
    database: &str,
    table: &str,
    bucket: &str,
    prefix: &str,
    projection_start_year: i32,
) -> Result<String, DdlError> {
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    for (flag, value) in [("database", database), ("table", table)] {
        if !valid(value) {
            return Err(DdlError::Name { flag, value: value.into() });
        }
    }
    if prefix.contains(['\'', '`']) {
        return Err(DdlError::Prefix(prefix.into()));
    }
    // An empty prefix puts the trail at the bucket's root (keys are joined without it).
    let location = match prefix.trim_matches('/') {
        "" => format!("s3://{bucket}/"),
        prefix => format!("s3://{bucket}/{prefix}/"),
    };
    Ok(TEMPLATE
        .replace("{{database}}", database)
        .replace("{{table}}", table)
        .replace("{{location}}", &location)
        .replace("{{projection_start_year}}", &projection_start_year.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_all_filled() {
        let sql = super::ddl("audit", "decisions", "bkt", "trail", 2000).unwrap();
        assert!(!sql.contains("{{"), "{sql}");
        assert!(sql.contains("s3://bkt/trail/"));
        let root = super::ddl("audit", "decisions", "bkt", "", 2000).unwrap();
        assert!(root.contains("LOCATION 's3://bkt/'") && root.contains("'s3://bkt/year=${year}/"), "{root}");
        assert!(!root.contains("bkt//"));
        assert!(super::ddl("audit", "Bad-Name", "bkt", "trail", 2000).unwrap_err().to_string().contains("--table"));
    }
}
