//! `config::ConfigWatch<T>`: typed config hot-reload (not built yet; see issue 6).
