use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

#[tokio::test]
async fn appends_truncations_purges_and_the_hard_state_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = RaftStorage::open(dir.path()).unwrap();
        let log = s.log_store();
        log.persist_entries((1..=10).map(|i| entry(i, 1)).collect())
            .await
            .unwrap();
        log.replace_range(8, vec![entry(8, 2), entry(9, 2)])
            .await
            .unwrap();
        assert_eq!(log.last_index(), 9);
        log.purge(LogId { index: 3, term: 1 }).await.unwrap();
        log.flush().unwrap();
        let vote = VotedFor {
            voted_for_id: 2,
            voted_for_term: 2,
            committed: true,
        };
        s.meta_store()
            .save_hard_state(&HardState {
                current_term: 2,
                voted_for: Some(vote),
            })
            .unwrap();
    }
    let s = RaftStorage::open(dir.path()).unwrap();
    let log = s.log_store();
    assert_eq!(log.last_index(), 9);
    let got: Vec<(u64, u64)> = log
        .get_entries(1..=9)
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    let want: Vec<(u64, u64)> = (4..=7).map(|i| (i, 1)).chain([(8, 2), (9, 2)]).collect();
    assert_eq!(got, want);
    assert_eq!(
        log.load_purge_boundary().unwrap(),
        Some(LogId { index: 3, term: 1 })
    );
    let hs = s.meta_store().load_hard_state().unwrap().unwrap();
    assert_eq!(hs.current_term, 2);
    assert_eq!(hs.voted_for.map(|v| v.voted_for_id), Some(2));
    assert_eq!(
        s.summary().unwrap(),
        LogSummary {
            bounds: Some((4, 9)),
            holes: vec![],
            purged: Some((3, 1)),
            saved_term: 2,
            last_term: 2,
        }
    );
    log.truncate(5).await.unwrap();
    assert_eq!(log.last_index(), 4);
    log.reset().await.unwrap();
    assert_eq!(log.last_index(), 0);
    assert_eq!(log.load_purge_boundary().unwrap(), None);
}

#[tokio::test]
async fn a_saved_term_behind_the_log_is_raised_to_the_log_term_without_a_vote() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStorage::open(dir.path()).unwrap();
    let meta = s.meta_store();
    assert!(meta.load_hard_state().unwrap().is_none());
    let vote = VotedFor {
        voted_for_id: 1,
        voted_for_term: 2,
        committed: false,
    };
    let saved = HardState {
        current_term: 2,
        voted_for: Some(vote),
    };
    meta.save_hard_state(&saved).unwrap();
    let log = s.log_store();
    log.persist_entries(vec![entry(1, 2)]).await.unwrap();
    let got = meta.load_hard_state().unwrap().unwrap();
    assert_eq!((got.current_term, got.voted_for), (2, Some(vote)));
    log.persist_entries(vec![entry(2, 5)]).await.unwrap();
    let got = meta.load_hard_state().unwrap().unwrap();
    assert_eq!((got.current_term, got.voted_for), (5, None));
    log.purge(LogId { index: 2, term: 5 }).await.unwrap();
    assert_eq!(meta.load_hard_state().unwrap().unwrap().current_term, 5);
}

#[tokio::test]
async fn a_summary_names_the_holes() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStorage::open(dir.path()).unwrap();
    let entries = [1, 2, 3, 7, 8, 20].map(|i| entry(i, 1)).to_vec();
    s.log_store().persist_entries(entries).await.unwrap();
    let summary = s.summary().unwrap();
    assert_eq!(summary.bounds, Some((1, 20)));
    assert_eq!(summary.holes, vec![4..=6, 9..=19]);
}

#[test]
fn the_file_raft_log_of_an_older_dcoord_is_refused_with_instructions() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("storage").join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("log.data"), b"").unwrap();
    let err = open_raft_log(dir.path()).unwrap_err().to_string();
    assert!(err.contains("file raft log") && err.contains("move its data directory away"));
}
