"""The compute slots of the threads runner: a freed slot goes to the waiting task of lowest rank."""
import threading
import time

from rumflow.tasks.compute import RankedSlots


def test_a_freed_slot_goes_to_the_lowest_rank_then_to_the_earliest_arrival():
    slots, order, threads = RankedSlots(1), [], []
    slots.acquire(())  # held while the others line up

    def wait(rank, name):
        slots.acquire(rank)
        order.append(name)
        slots.release()

    for rank, name in (((2,), "chain 2"), ((1,), "chain 1, first"), ((1,), "chain 1, second"), ((), "source")):
        threads.append(threading.Thread(target=wait, args=(rank, name)))
        threads[-1].start()
        while len(slots.waiting) < len(threads):  # arrivals in this order
            time.sleep(0.001)
    slots.release()
    for t in threads:
        t.join(5)
    assert order == ["source", "chain 1, first", "chain 1, second", "chain 2"]


def test_two_slots_run_two_at_once():
    slots, inside, most = RankedSlots(2), [], []
    lock = threading.Lock()

    def work():
        slots.acquire((0,))
        with lock:
            inside.append(1)
            most.append(len(inside))
        time.sleep(0.05)
        with lock:
            inside.pop()
        slots.release()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert max(most) == 2 and slots.free == 2
