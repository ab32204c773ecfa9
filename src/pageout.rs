//! Handing back the start-up code's pages once the daemon serves.
//!
//! Loading models runs a large share of the binary once (tract's ONNX
//! parser, its optimiser, the engines' agreement checks); those pages of
//! the executable stay mapped afterwards and are most of an idle daemon's
//! RSS (about 22 of 30 MiB). Once the daemon is ready, [`release_code_pages`]
//! unmaps them with `madvise(MADV_DONTNEED)`: the next instruction fetched
//! from such a page refaults it from the page cache, so serving code comes
//! back on first use and start-up code stays out. Only read-only mappings of
//! the executable with no private (copy-on-write) pages are touched, so no
//! content can change: the kernel refills every page from the file.
//!
//! smaps is not trusted alone for that: a page the loader relocated (the
//! vtables and function-pointer tables of `PT_GNU_RELRO`) refills from the
//! file *unrelocated*, and the next call through it jumps to a link-time
//! address. Under qemu-user (how ARM containers are often run, and our ARM
//! tests), the guest's smaps showed the armv7 binary's text mapping running
//! one page into its RELRO with `Anonymous: 0`, and dropping it crashed the
//! daemon on its first `noop_waker` (2026-12-07). So the pages dropped are
//! also limited to those of the executable's read-only `PT_LOAD` segments
//! that no writable segment and no RELRO range touches, from its own
//! program headers ([`pristine_spans`]).
//!
//! The pages stay in the page cache until the kernel needs the memory
//! (unmapped clean pages are the first it reclaims); a cgroup's
//! `memory.current` counts them until then.
//!
//! The heap gets the same treatment: loading leaves freed memory inside
//! glibc's arenas (the parsed protobuf, tract's intermediate models), which
//! glibc keeps for later allocations rather than returning it, since it is
//! not at the top of an arena. [`trim_heap`] asks glibc to hand those pages
//! back (`malloc_trim`). `EDGEINFER_KEEP_STARTUP_CODE=1` skips all this
//! (README "Memory").

use std::io;
use std::path::Path;

/// One mapping read from `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `r-xp` and the like.
    pub perms: String,
    /// The mapped file, or `[heap]` and the like; empty for anonymous memory.
    pub path: String,
    pub rss_kib: u64,
    /// Pages the process wrote (or the loader relocated) and so owns, no
    /// longer the file's: `None` where the kernel (or an emulator's
    /// imitation of smaps) leaves the field out. Not `Private_Dirty`: that
    /// also counts page-cache pages not yet written back (a binary just
    /// linked), which refill from the cache unchanged.
    pub anonymous_kib: Option<u64>,
}

impl Mapping {
    /// Whether unmapping this mapping's pages can never change what the
    /// process reads back: read-only, and every page still the file's.
    fn refills_from_file(&self) -> bool {
        !self.perms.contains('w') && self.anonymous_kib == Some(0) && self.end > self.start
    }
}

/// What [`release_code_pages`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub mappings: usize,
    /// Resident bytes of those mappings just before.
    pub bytes: u64,
}

/// The mappings in `/proc/<pid>/smaps` text. Lines it does not know are
/// skipped; fields a header lacks are zero (`Rss`) or `None`.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => current.rss_kib = value,
            "Anonymous:" => current.anonymous_kib = Some(value),
            _ => {}
        }
    }
    out
}

/// `start-end perms offset dev inode [path]`; the path may hold spaces.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut next = || {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let (field, tail) = t.split_at(end);
        rest = tail;
        field
    };
    let range = next();
    let perms = next();
    let (offset, dev, inode) = (next(), next(), next());
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if perms.len() != 4 || !hex(offset) || !dev.contains(':') || inode.parse::<u64>().is_err() {
        return None;
    }
    Some(Mapping {
        start,
        end,
        perms: perms.to_owned(),
        path: rest.trim().to_owned(),
        rss_kib: 0,
        anonymous_kib: None,
    })
}

/// The mappings whose pages [`release_code_pages`] may drop: the
/// executable's, matched by path (device numbers differ on overlay file
/// systems), and only those that refill from the file.
pub fn releasable<'a>(maps: &'a [Mapping], exe: &'a Path) -> impl Iterator<Item = &'a Mapping> {
    maps.iter()
        .filter(move |m| Path::new(&m.path) == exe && m.refills_from_file())
}

/// One segment of the executable as loaded, at its run-time addresses
/// (`[start, end)`, not rounded to pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub end: usize,
    /// A `PT_LOAD` without `PF_W`: holds the file's bytes for the process's
    /// life. Otherwise written: a writable `PT_LOAD`, or `PT_GNU_RELRO`
    /// (relocated by the loader, then made read-only).
    pub read_only: bool,
}

/// The page-aligned ranges `[start, end)` that hold only the file's bytes:
/// every page a read-only segment touches, less every page a written one
/// touches (a page the two share is the process's own). Sorted.
pub fn pristine_spans(segments: &[Segment], page: usize) -> Vec<(usize, usize)> {
    let down = |a: usize| a / page * page;
    let up = |a: usize| a.div_ceil(page) * page;
    let mut spans: Vec<(usize, usize)> = segments
        .iter()
        .filter(|s| s.read_only && s.end > s.start)
        .map(|s| (down(s.start), up(s.end)))
        .collect();
    for w in segments.iter().filter(|s| !s.read_only && s.end > s.start) {
        let (ws, we) = (down(w.start), up(w.end));
        // What is left of each span below and above the written pages
        // (the whole span when they miss it).
        let mut left = Vec::with_capacity(spans.len() + 1);
        for (a, b) in spans {
            if a < ws.min(b) {
                left.push((a, ws.min(b)));
            }
            if we.max(a) < b {
                left.push((we.max(a), b));
            }
        }
        spans = left;
    }
    spans.sort_unstable();
    spans
}

/// The parts of `m` inside `spans`.
fn clip(m: &Mapping, spans: &[(usize, usize)]) -> Vec<(usize, usize)> {
    spans
        .iter()
        .map(|&(a, b)| (a.max(m.start), b.min(m.end)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// The executable's loaded segments, from its program headers as the
/// loader reports them (`dl_iterate_phdr`, whose first entry is the
/// program itself).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn executable_segments() -> Vec<Segment> {
    // The callback glibc calls: `unsafe extern "C"` is its type.
    #[allow(unsafe_code)]
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        out: *mut std::ffi::c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` whose `dlpi_phdr`
        // points at `dlpi_phnum` program headers, all valid for the call;
        // `out` is the `Vec<Segment>` `executable_segments` passed, which
        // nothing else touches meanwhile.
        #[allow(unsafe_code)]
        unsafe {
            let info = &*info;
            let out = &mut *(out as *mut Vec<Segment>);
            let headers = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            let base = info.dlpi_addr as usize;
            for h in headers {
                let start = base.wrapping_add(h.p_vaddr as usize);
                let end = start.wrapping_add(h.p_memsz as usize);
                match h.p_type {
                    libc::PT_LOAD => out.push(Segment {
                        start,
                        end,
                        read_only: h.p_flags & libc::PF_W == 0,
                    }),
                    libc::PT_GNU_RELRO => out.push(Segment {
                        start,
                        end,
                        read_only: false,
                    }),
                    _ => {}
                }
            }
        }
        1 // the program only: stop
    }
    let mut out: Vec<Segment> = Vec::new();
    // SAFETY: `first` matches the callback glibc expects and only writes to
    // `out`, which outlives the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::dl_iterate_phdr(Some(first), &mut out as *mut Vec<Segment> as *mut _);
    }
    out
}

/// Elsewhere the segments are not read, and nothing is released.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn executable_segments() -> Vec<Segment> {
    Vec::new()
}

/// Unmaps the resident pages of the executable's read-only mappings (see
/// the module's comment), within [`pristine_spans`] of its segments. If
/// `madvise` is refused (a seccomp filter), the first refusal is the error;
/// a later one ends it with what was done. Mappings shown with no resident
/// pages are skipped, which also leaves alone an emulator's smaps that
/// reports zeroes (older qemu-user).
pub fn release_code_pages() -> io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?);
    let spans = pristine_spans(&executable_segments(), rustix::param::page_size());
    let mut done = Released::default();
    for m in releasable(&maps, &exe) {
        if m.rss_kib == 0 {
            continue;
        }
        let parts = clip(m, &spans);
        if parts.is_empty() {
            continue;
        }
        for (start, end) in parts {
            // SAFETY: the range lies in one mapping of this process's own
            // executable, read from /proc/self/smaps just above, read-only
            // and with no private pages (`refills_from_file`), and in pages
            // of its read-only segments that no relocated or writable
            // segment shares (`pristine_spans`, from its program headers).
            // MADV_DONTNEED on such a range only drops page-table entries:
            // every later access refaults the same bytes from the file, so
            // no reference into it (code, string literals, statics) sees a
            // change. The executable is never unmapped while the process
            // runs, so the range stays valid.
            #[allow(unsafe_code)]
            let r = unsafe {
                rustix::mm::madvise(
                    start as *mut std::ffi::c_void,
                    end - start,
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
            if let Err(e) = r {
                return if done.mappings == 0 {
                    Err(e.into())
                } else {
                    Ok(done)
                };
            }
        }
        done.mappings += 1;
        done.bytes += m.rss_kib * 1024;
    }
    Ok(done)
}

/// Hands the free pages inside glibc's heap back to the kernel
/// (`malloc_trim(0)`: every arena, not only the top of the main one).
/// Returns whether glibc released any. Elsewhere (musl, other systems) it
/// does nothing and returns false.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim takes no pointer and touches only glibc's own
    // arenas, each under its lock; glibc documents it as safe to call from
    // any thread at any time (MT-Safe). Memory still allocated is not moved.
    #[allow(unsafe_code)]
    let released = unsafe { libc::malloc_trim(0) };
    released == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() -> bool {
    false
}

/// The daemon's call once it is ready (after a start or a restart) and
/// after each model loaded later (`ops::load_spec`: a reload in place, a
/// model update): does both unless
/// `EDGEINFER_KEEP_STARTUP_CODE=1`, and logs what it gave back.
pub fn after_loading() {
    if std::env::var_os("EDGEINFER_KEEP_STARTUP_CODE").is_some_and(|v| v == "1") {
        return;
    }
    match release_code_pages() {
        Ok(r) => tracing::debug!(
            mappings = r.mappings,
            mib = format_args!("{:.1}", r.bytes as f64 / (1024.0 * 1024.0)),
            "Gave back the start-up code's pages"
        ),
        Err(e) => tracing::debug!(error = %e, "Kept the start-up code's pages"),
    }
    let trimmed = trim_heap();
    tracing::debug!(trimmed, "Trimmed the heap");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's anonymous resident memory, from /proc/self/status.
    #[cfg(all(target_env = "gnu", target_arch = "x86_64"))]
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    // Native x86-64 only: under qemu-user (the ARM tests) the process's RSS
    // is the emulator's, which does not follow the guest's madvise calls.
    #[cfg(all(target_env = "gnu", target_arch = "x86_64"))]
    #[test]
    fn trimming_hands_back_memory_freed_below_a_live_block() {
        // 256 MiB in 4 KiB blocks (under glibc's mmap threshold, so they come
        // from an arena), every page written; one block allocated after them
        // stays alive, so freeing the rest leaves them in the middle of the
        // arena, which free() alone never returns.
        const BLOCKS: usize = 65_536;
        let mut blocks: Vec<Box<[u8; 4096]>> =
            (0..BLOCKS).map(|i| Box::new([i as u8; 4096])).collect();
        let keep = Box::new([1u8; 4096]);
        blocks.clear();
        blocks.shrink_to_fit();
        let before = rss_anon_kib();
        assert!(trim_heap(), "glibc released nothing");
        let after = rss_anon_kib();
        // Other tests run beside this one and allocate too: ask for half.
        assert!(
            before.saturating_sub(after) >= 128 * 1024,
            "RssAnon {before} kB -> {after} kB: less than 128 MiB handed back"
        );
        assert_eq!(keep[4095], 1);
    }

    #[cfg(target_pointer_width = "64")]
    const SAMPLE: &str = "\
564b009b5000-564b01125000 r--p 00000000 fe:00 5313060                    /opt/edge infer/edgeinfer
Size:               7616 kB
Rss:                3980 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
564b01125000-564b02e2e000 r-xp 0076f000 fe:00 5313060                    /opt/edge infer/edgeinfer
Rss:               17484 kB
Private_Dirty:     17484 kB
Anonymous:             0 kB
564b02e2e000-564b02f0c000 r--p 02477000 fe:00 5313060                    /opt/edge infer/edgeinfer
Rss:                 888 kB
Private_Dirty:       884 kB
Anonymous:           884 kB
564b02f0c000-564b02f12000 rw-p 02554000 fe:00 5313060                    /opt/edge infer/edgeinfer
Rss:                  24 kB
Anonymous:            24 kB
7fc48c000000-7fc48c4e2000 rw-p 00000000 00:00 0 
Rss:                4984 kB
Anonymous:          4984 kB
7fc49491b000-7fc494a71000 r-xp 00026000 fe:00 326279                     /usr/lib/libc.so.6
Rss:                1044 kB
Anonymous:             0 kB
";

    // The sample is a 64-bit process's smaps.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn smaps_headers_and_fields_are_read() {
        let maps = parse_smaps(SAMPLE);
        assert_eq!(maps.len(), 6);
        assert_eq!(maps[1].start, 0x564b_0112_5000);
        assert_eq!(maps[1].end, 0x564b_02e2_e000);
        assert_eq!(maps[1].perms, "r-xp");
        assert_eq!(maps[1].path, "/opt/edge infer/edgeinfer");
        assert_eq!(maps[1].rss_kib, 17484);
        assert_eq!(maps[2].anonymous_kib, Some(884));
        assert_eq!(maps[5].anonymous_kib, Some(0));
        assert_eq!(maps[4].path, "");
        assert_eq!(maps[4].rss_kib, 4984);
    }

    // The sample is a 64-bit process's smaps.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn only_the_executables_pure_read_only_mappings_are_releasable() {
        let maps = parse_smaps(SAMPLE);
        let picked: Vec<_> = releasable(&maps, Path::new("/opt/edge infer/edgeinfer"))
            .map(|m| m.start)
            .collect();
        // Not the relocated read-only part (copy-on-write pages), not the
        // writable data, not the heap, not another file's code.
        assert_eq!(picked, vec![0x564b_009b_5000, 0x564b_0112_5000]);
        assert_eq!(releasable(&maps, Path::new("/usr/bin/other")).count(), 0);
        // A mapping whose smaps entry does not say it has no private pages
        // (an emulator's imitation) is left alone.
        let mut unsure = maps[1].clone();
        unsure.anonymous_kib = None;
        assert!(!unsure.refills_from_file());
    }

    const PAGE: usize = 0x1000;

    fn seg(start: usize, end: usize, read_only: bool) -> Segment {
        Segment {
            start,
            end,
            read_only,
        }
    }

    // The armv7 `dist` binary of 2026-12-07 (GNU ld): code up to 0x13561d0,
    // the writable segment from 0x1357c00, RELRO its first 0x54400 bytes;
    // under qemu-arm its smaps showed the code mapping running to
    // 0x1358000, one page into the RELRO, with `Anonymous: 0`.
    #[test]
    fn a_page_of_relocated_data_is_never_released_whatever_smaps_says() {
        let segments = [
            seg(0, 0x0135_61d0, true),
            seg(0x0135_7c00, 0x013a_e5ec, false),
            seg(0x0135_7c00, 0x013a_c000, false),
        ];
        let spans = pristine_spans(&segments, PAGE);
        assert_eq!(spans, vec![(0, 0x0135_7000)]);
        let qemu = Mapping {
            start: 0x2000,
            end: 0x0135_8000,
            perms: "r-xp".into(),
            path: "/usr/bin/edgeinfer".into(),
            rss_kib: 19_800,
            anonymous_kib: Some(0),
        };
        assert!(qemu.refills_from_file(), "smaps alone would let it go");
        assert_eq!(clip(&qemu, &spans), vec![(0x2000, 0x0135_7000)]);
    }

    // Without separate code pages the last page of code is also the first
    // of the data: it is the process's own (the loader wrote the data half).
    #[test]
    fn a_page_code_shares_with_written_data_is_kept() {
        let segments = [
            seg(0x400, 0x1_0a00, true),
            seg(0x1_0c00, 0x1_2000, false),
            seg(0x2_0000, 0x2_3000, true),
        ];
        assert_eq!(
            pristine_spans(&segments, PAGE),
            vec![(0, 0x1_0000), (0x2_0000, 0x2_3000)]
        );
        // A written segment in the middle of a read-only one splits it.
        let segments = [seg(0, 0x8000, true), seg(0x3100, 0x3200, false)];
        assert_eq!(
            pristine_spans(&segments, PAGE),
            vec![(0, 0x3000), (0x4000, 0x8000)]
        );
    }

    fn one() -> u8 {
        1
    }
    fn two() -> u8 {
        2
    }
    // Function pointers in a static: in a position-independent executable
    // the loader relocates them, so they live in RELRO.
    static TABLE: [fn() -> u8; 2] = [one, two];

    // Read from this test binary's own program headers.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn this_programs_segments_put_code_in_and_relocated_tables_out() {
        let segments = executable_segments();
        assert!(segments.iter().any(|s| s.read_only), "{segments:x?}");
        let spans = pristine_spans(&segments, rustix::param::page_size());
        let inside = |a: usize| spans.iter().any(|&(s, e)| s <= a && a < e);
        let code = one as fn() -> u8 as usize;
        assert!(inside(code), "code at {code:#x} not in {spans:x?}");
        let table = std::ptr::addr_of!(TABLE) as usize;
        assert!(
            !inside(table),
            "relocated table at {table:#x} in {spans:x?}"
        );
        assert!(
            segments
                .iter()
                .any(|s| !s.read_only && s.start <= table && table < s.end),
            "relocated table at {table:#x} in no written segment of {segments:x?}"
        );
        assert_eq!(TABLE[1](), 2);
    }

    #[test]
    fn lines_that_are_not_headers_are_not_taken_for_one() {
        assert!(parse_header("Rss:                3980 kB").is_none());
        assert!(parse_header("VmFlags: rd mr mw me sd").is_none());
        assert!(parse_header("").is_none());
        assert!(parse_header("zz-10 r-xp 0 fe:00 1 /x").is_none());
    }
}
