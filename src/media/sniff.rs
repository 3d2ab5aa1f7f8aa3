//! Recognises a file's type from its first bytes, never from its name: a PNG renamed `.mp3` is a PNG.
//! Covers the containers recordings arrive in, and the common non-media types so that the error can say
//! what the file is.

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sniffed {
    /// The MIME type, when recognised.
    pub mime: Option<&'static str>,
    /// Whether it is an audio or video container.
    pub media: bool,
}

/// How many leading bytes [`sniff`] wants; fewer work for short files.
pub const SNIFF_LEN: usize = 64;

/// Recognises `head`, the first bytes of a file.
pub fn sniff(head: &[u8]) -> Sniffed {
    let media = |mime| Sniffed { mime: Some(mime), media: true };
    let other = |mime| Sniffed { mime: Some(mime), media: false };
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"RIFF") && at(8, b"WAVE") {
        return media("audio/wav");
    }
    if at(0, b"RIFF") && at(8, b"AVI ") {
        return media("video/x-msvideo");
    }
    if at(0, b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
        return media("audio/aiff");
    }
    if at(4, b"ftyp") {
        let brand = head.get(8..12).unwrap_or_default();
        return match brand {
            b"M4A " | b"M4B " | b"M4P " => media("audio/mp4"),
            b"qt  " => media("video/quicktime"),
            b"3gp4" | b"3gp5" | b"3gp6" | b"3g2a" => media("video/3gpp"),
            _ => media("video/mp4"),
        };
    }
    if at(0, b"OggS") {
        return media("audio/ogg");
    }
    if at(0, b"fLaC") {
        return media("audio/flac");
    }
    if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        let webm = head.windows(4).any(|window| window == b"webm");
        return media(if webm { "video/webm" } else { "video/x-matroska" });
    }
    if at(0, b"ID3") {
        return media("audio/mpeg");
    }
    if at(0, b"#!AMR") {
        return media("audio/amr");
    }
    if at(0, &[0x30, 0x26, 0xB2, 0x75]) {
        return media("video/x-ms-asf");
    }
    if head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 {
        // An MPEG audio frame sync; layer bits 00 with the ADTS pattern mean AAC.
        return media(if head[1] & 0x06 == 0 { "audio/aac" } else { "audio/mpeg" });
    }
    if at(0, &[0x89, b'P', b'N', b'G']) {
        return other("image/png");
    }
    if at(0, &[0xFF, 0xD8, 0xFF]) {
        return other("image/jpeg");
    }
    if at(0, b"GIF8") {
        return other("image/gif");
    }
    if at(0, b"%PDF") {
        return other("application/pdf");
    }
    if at(0, b"PK\x03\x04") {
        return other("application/zip");
    }
    if !head.is_empty() && std::str::from_utf8(head).is_ok() {
        return other("text/plain");
    }
    Sniffed { mime: None, media: false }
}

/// Whether `mime` matches a pattern such as `audio/*` or `video/mp4`.
pub fn matches(mime: &str, pattern: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(kind) => mime.split('/').next() == Some(kind),
        None => mime == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_containers_by_their_bytes() {
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt ").mime, Some("audio/wav"));
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A \0\0").mime, Some("audio/mp4"));
        assert_eq!(sniff(b"\0\0\0\x20ftypisom\0\0").mime, Some("video/mp4"));
        assert_eq!(sniff(b"ID3\x04\0\0").mime, Some("audio/mpeg"));
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x64]).mime, Some("audio/mpeg"));
        assert_eq!(sniff(&[0xFF, 0xF1, 0x50, 0x80]).mime, Some("audio/aac"));
        assert!(sniff(b"OggS\0\x02").media);
        let png = sniff(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A]);
        assert_eq!((png.mime, png.media), (Some("image/png"), false));
        assert_eq!(sniff(b"hello world").mime, Some("text/plain"));
        assert_eq!(sniff(b"").mime, None);
    }

    #[test]
    fn patterns_match_types_and_subtypes() {
        assert!(matches("audio/mpeg", "audio/*"));
        assert!(matches("video/mp4", "video/mp4"));
        assert!(!matches("image/png", "audio/*"));
    }
}
