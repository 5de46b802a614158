//! `lock::Mutex`: a fair, fenced, crash-safe lock (not built yet; see issue 4).
