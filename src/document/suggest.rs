//! "Did you mean" suggestions for misspelled keys, stage ids and stage kinds.

/// The candidate closest to `given` by edit distance, if it is close enough to be a plausible typo.
pub fn closest<'a, S: AsRef<str>>(given: &str, candidates: &'a [S]) -> Option<&'a str> {
    // A third of the word may be wrong, but at least two edits are always allowed for short names.
    let limit = (given.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(AsRef::as_ref)
        .map(|candidate| (distance(given, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let kinds = ["validate", "download", "transcode", "whisper", "analyze", "persist"];
        assert_eq!(closest("wisper", &kinds), Some("whisper"));
        assert_eq!(closest("transcod", &kinds), Some("transcode"));
        assert_eq!(closest("summarize", &kinds), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
