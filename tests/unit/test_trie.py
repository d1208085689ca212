from worker.trie import TokenTrie, common_prefix_length


def test_common_prefix_length_across_blocks():
    a = list(range(1000))
    b = list(range(1000))
    b[700] = -1
    assert common_prefix_length(a, b) == 700
    assert common_prefix_length(a, a[:10]) == 10
    assert common_prefix_length([], a) == 0


def test_match_follows_inserted_paths_and_stops_at_divergence():
    trie = TokenTrie()
    trie.attach_entry([1, 2, 3, 4, 5], "a")
    trie.attach_entry([1, 2, 3, 9], "b")
    assert trie.match([1, 2, 3, 4, 5, 6]).length == 5
    assert trie.match([1, 2, 3, 9, 9]).length == 4
    assert trie.match([1, 2, 7]).length == 2
    assert trie.match([8]).length == 0


def test_split_keeps_checkpoints_on_the_right_side():
    trie = TokenTrie()
    trie.attach_entry([1, 2, 3, 4, 5, 6], "a")
    trie.add_checkpoint([1, 2, 3, 4, 5, 6], 2, "at2")
    trie.add_checkpoint([1, 2, 3, 4, 5, 6], 5, "at5")
    trie.attach_entry([1, 2, 3, 4, 0], "b")  # splits the edge at depth 4
    match = trie.match([1, 2, 3, 4, 5, 6, 7])
    assert [d for d, _ in match.checkpoints(7)] == [5, 2]
    assert [d for d, _ in trie.match([1, 2, 3, 4, 0]).checkpoints(5)] == [2]


def test_checkpoints_deeper_than_the_limit_are_skipped():
    trie = TokenTrie()
    trie.attach_entry([1, 2, 3, 4], "a")
    for d in (1, 2, 3, 4):
        trie.add_checkpoint([1, 2, 3, 4], d, d)
    assert [d for d, _ in trie.match([1, 2, 3, 4]).checkpoints(2)] == [2, 1]


def test_branch_depth_of_sequences_under_a_node():
    trie = TokenTrie()
    node_a = trie.attach_entry([1, 2, 3, 4], "a")
    node_b = trie.attach_entry([1, 2, 5, 6], "b")
    match = trie.match([1, 2, 3, 4, 7])
    assert match.branch_depth(node_a) == 4
    assert match.branch_depth(node_b) == 2


def test_detaching_the_last_entry_prunes_its_path_and_returns_its_checkpoints():
    trie = TokenTrie()
    node_a = trie.attach_entry([1, 2, 3], "a")
    trie.attach_entry([1, 2, 4], "b")
    trie.add_checkpoint([1, 2, 3], 3, "a3")
    trie.add_checkpoint([1, 2, 3], 2, "shared2")
    dropped = trie.detach_entry(node_a, "a")
    assert dropped == ["a3"]
    assert trie.match([1, 2, 3]).length == 2
    assert [v for _, v in trie.match([1, 2, 4]).checkpoints(3)] == ["shared2"]


def test_entries_under_lists_the_subtree():
    trie = TokenTrie()
    trie.attach_entry([1, 2], "short")
    trie.attach_entry([1, 2, 3], "long")
    trie.attach_entry([5], "other")
    node = trie.match([1, 2]).node_at(2)
    assert sorted(k for _, k in trie.entries_under(node)) == ["long", "short"]


def test_namespaces_never_share_a_node():
    trie = TokenTrie()
    trie.attach_entry([1, 2, 3], "a", namespace="x")
    trie.attach_entry([1, 2, 4], "b", namespace="y")
    trie.attach_entry([1, 2, 5], "c")
    assert trie.match([1, 2, 3], "x").length == 3
    assert trie.match([1, 2, 3], "y").length == 2  # its own [1, 2, 4]
    assert trie.match([1, 2, 3]).length == 2
    assert trie.match([1, 2, 4], "x").length == 2
    node = trie.insert([1, 2, 3], "x")
    assert node.namespace == "x" and all(n.namespace == "x" for n in trie.path_to(node))
    trie.detach_entry(node, "a")
    assert trie.match([1, 2, 3], "x").length == 0  # pruned up to the root
    assert trie.match([1, 2, 4], "y").length == 3
