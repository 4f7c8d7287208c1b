"""Early stopping on scripted metric sequences: 4-decimal rounding, strict improvement, patience."""

from lgmrec_jax.early_stopping import EarlyStopping


def run(values, patience=2):
    es = EarlyStopping(patience)
    for epoch, v in enumerate(values):
        if es.update(epoch, v, {"recall@20": v}, {"recall@20": 10 * epoch}):
            return es, epoch
    return es, None


def test_ties_do_not_update():
    es, _ = run([0.1, 0.2, 0.2, 0.15])
    assert es.best_epoch == 1 and es.best_test == {"recall@20": 10}


def test_rounding_turns_tiny_gains_into_ties():
    es, _ = run([0.09571, 0.09574])  # both round to 0.0957: the first stays best
    assert es.best_epoch == 0
    es, _ = run([0.09571, 0.09576])  # 0.0957 < 0.0958: improvement
    assert es.best_epoch == 1


def test_stops_after_patience_plus_one_bad_epochs():
    es, stopped = run([0.3, 0.1, 0.1, 0.1, 0.1], patience=2)
    assert stopped == 3 and es.counter == 3 and es.best_epoch == 0


def test_improvement_resets_counter_and_state_round_trips():
    es, stopped = run([0.1, 0.05, 0.05, 0.2, 0.1, 0.1], patience=2)
    assert stopped is None and es.best_epoch == 3 and es.counter == 2
    again = EarlyStopping.from_state_dict(es.state_dict())
    assert again == es
