// The set pages' "select this page" checkbox. Without JavaScript each row's own
// checkbox still works.
(function () {
  var all = document.getElementById("select-all");
  if (!all) { return; }
  all.addEventListener("change", function () {
    document.querySelectorAll("input.select").forEach(function (box) { box.checked = all.checked; });
  });
})();
